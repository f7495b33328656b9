"""The papers' networks as ordinary ``nn.Module``s, built so that forward hooks see every site."""

from isoprobe.nets.bn_mlp import BNMLP, RMSBatchNorm
from isoprobe.nets.lnmlp import LNMLP, Act, LNBlock, Norm

__all__ = ["Act", "BNMLP", "LNBlock", "LNMLP", "Norm", "RMSBatchNorm"]
