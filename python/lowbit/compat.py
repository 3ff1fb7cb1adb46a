"""Bitorch Engine (BIE) names for lowbit layers: same constructors, same state-dict keys.

``from lowbit.compat import Q8LinearCutlass`` is a drop-in for BIE's class of that name; where lowbit
fixes a BIE defect the behaviour differs as listed in docs/compat.md."""
from __future__ import annotations

from .nn import Q8Linear
from .tools import prepare_layers

Q8LinearCutlass = Q8Linear
prepare_bie_layers = prepare_layers

__all__ = ["Q8LinearCutlass", "prepare_bie_layers"]
