"""Values as JSON can hold them: the one conversion every file and MLflow artifact we write uses.

numpy scalars and arrays become Python numbers and lists, tuples become lists, dict keys strings,
and NaN becomes null: `json.dumps` would write NaN, which is not JSON and which strict readers
(browsers, `jq`, DVC's metrics parser) refuse. `nan_as_null=False` keeps NaN for the files that
have always carried it, so their readers see what they saw before.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def jsonable(value: Any, nan_as_null: bool = True) -> Any:
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist(), nan_as_null)
    if isinstance(value, np.generic):
        return jsonable(value.item(), nan_as_null)
    if isinstance(value, float) and nan_as_null and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(key): jsonable(item, nan_as_null) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item, nan_as_null) for item in value]
    return value
