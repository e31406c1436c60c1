"""Figures quoted from the RMT paper, kept apart so nothing measured is ever confused with them."""
from __future__ import annotations

SOURCE = ("RMT paper (Fan et al., 'RMT: Retentive Networks Meet Vision Transformers', CVPR 2024), Table 9; "
          "the paper names neither the GPU nor the batch size")

# name -> top-1 (%), GFLOPs (multiply-adds at 224x224) and images/s, all quoted from SOURCE.
TABLE9 = {
    "rmt_t": {"top1": 82.4, "gflops": 2.5, "images_per_s": 1650},
    "rmt_s": {"top1": 84.1, "gflops": 4.5, "images_per_s": 876},
    "rmt_b": {"top1": 85.0, "gflops": 9.7, "images_per_s": 457},
    "rmt_l": {"top1": 85.5, "gflops": 18.2, "images_per_s": 326},
}
