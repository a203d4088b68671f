"""Label values shared by every stage (DESIGN.md, "Labels and geometry")."""

from enum import IntEnum


class Lobe(IntEnum):
    """Lobe labels in the paper's table order. 0 is background (not lung)."""

    RUL = 1
    RML = 2
    RLL = 3
    LUL = 4
    LLL = 5


class Opacity(IntEnum):
    """Opacity labels; opacity exists only inside the lungs. 0 is none."""

    GGO = 1
    CONSOLIDATION = 2


RIGHT_LOBES = (Lobe.RUL, Lobe.RML, Lobe.RLL)
LEFT_LOBES = (Lobe.LUL, Lobe.LLL)
# lungmask's LTRCLobes order (1 LUL, 2 LLL, 3 RUL, 4 RML, 5 RLL) mapped to ours, for the edges.
FROM_LTRC = {0: 0, 1: Lobe.LUL, 2: Lobe.LLL, 3: Lobe.RUL, 4: Lobe.RML, 5: Lobe.RLL}
