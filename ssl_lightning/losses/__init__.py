"""Pure loss functions: tensors in, scalar tensor out, equations in the docstrings."""

from ssl_lightning.losses.consistency import (
    cutmix_cross_entropy,
    info_nce,
    masked_cross_entropy,
    zscore,
    zscore_mse,
)

__all__ = ["cutmix_cross_entropy", "info_nce", "masked_cross_entropy", "zscore", "zscore_mse"]
