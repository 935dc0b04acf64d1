"""Test support for pydisco users: Hypothesis strategies for answers, endpoint timings and
migration scripts, and an executable model of the migration state machine.

Needs Hypothesis (``pip install pydisco[test]``).
"""

from __future__ import annotations

from ._migration_model import IllegalEvent as IllegalEvent
from ._migration_model import MigrationModel as MigrationModel
from ._strategies import answers as answers
from ._strategies import arrival_times as arrival_times
from ._strategies import endpoint_timelines as endpoint_timelines
from ._strategies import EndpointTimeline as EndpointTimeline
from ._strategies import pacing_scripts as pacing_scripts
from ._strategies import PacingStep as PacingStep
from ._strategies import token_texts as token_texts
from ._scripted import ScriptedEndpoint as ScriptedEndpoint
