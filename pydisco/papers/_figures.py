"""The papers' own headline figures, to print beside ours. Cited from the papers (as restated in
the project's reference notes), never measured here: a report labels them as the paper's."""

from __future__ import annotations

import dataclasses

__all__ = ["PAPER_FIGURES", "PaperFigure", "PAPERS"]


@dataclasses.dataclass(frozen=True)
class PaperFigure:
    """What a paper reports for one headline (its words and numbers) and where."""

    text: str
    paper: str


PAPERS = {
    "disco": "DiSCo (arXiv 2502.11417, ACL Findings 2025)",
    "pd": "P/D-Device (arXiv 2508.09035)",
    "andes": "Andes (arXiv 2404.16283)",
    "slice": "SLICE (arXiv 2510.18544)",
}

# Keyed like the measured headlines of `pydisco bench --json`.
PAPER_FIGURES: dict[str, PaperFigure] = {
    "disco_p99_ttft_cut": PaperFigure("tail TTFT -11 % to -52 %", PAPERS["disco"]),
    "disco_mean_ttft_cut": PaperFigure("mean TTFT -6 % to -78 %", PAPERS["disco"]),
    "disco_cost_cut": PaperFigure("serving cost -84 % via migration at comparable QoE", PAPERS["disco"]),
    "pd_ttft_cut": PaperFigure("TTFT -60 % or better", PAPERS["pd"]),
    "pd_max_tpot_ms": PaperFigure("max TPOT tens of ms", PAPERS["pd"]),
    "pd_cloud_throughput_gain": PaperFigure("cloud throughput up to 15x", PAPERS["pd"]),
    "andes_avg_qoe": PaperFigure("average QoE 0.88 -> 0.99 (one-hour BurstGPT slice)", PAPERS["andes"]),
    "andes_qoe95_share": PaperFigure("requests with QoE >= 0.95: 75 % -> 97 %", PAPERS["andes"]),
    "slice_attainment_ratio": PaperFigure("up to 35x higher SLO attainment than Orca and FastServe", PAPERS["slice"]),
}
