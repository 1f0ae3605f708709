"""What a page is: ``QuantSpec`` (how K or V is stored), ``Pages`` (the arrays, with
one-layer views), ``PageMeta`` (the per-page record), storage shapes and byte
accounting, and the named ``PRESETS``. The bottom layer: imports no other kvjax package.

>>> from kvjax.layout import PRESETS, compression
>>> k, v = PRESETS["int8"]
>>> round(compression(k, v, num_layers=30, num_kv_heads=3, head_dim=64, page_size=16), 2)
1.94
"""

from __future__ import annotations

from kvjax.layout.meta import init_meta
from kvjax.layout.meta import PageMeta
from kvjax.layout.pages import as_stored
from kvjax.layout.pages import check_layer
from kvjax.layout.pages import flat_layer
from kvjax.layout.pages import head_dim_of
from kvjax.layout.pages import layer_of
from kvjax.layout.pages import Pages
from kvjax.layout.pages import pool_only
from kvjax.layout.pages import with_flat_layer
from kvjax.layout.pages import with_layer
from kvjax.layout.presets import NUQ2_LEVELS
from kvjax.layout.presets import PRESETS
from kvjax.layout.shapes import bytes_per_token
from kvjax.layout.shapes import compression
from kvjax.layout.shapes import first_staged_page
from kvjax.layout.shapes import needs_staging
from kvjax.layout.shapes import page_shapes
from kvjax.layout.shapes import pages_to_fold
from kvjax.layout.shapes import residual_tokens
from kvjax.layout.shapes import sink_tokens
from kvjax.layout.shapes import staging_bytes_per_seq
from kvjax.layout.shapes import staging_pages
from kvjax.layout.shapes import zero_storage_dtype
from kvjax.layout.spec import AXES
from kvjax.layout.spec import BITS
from kvjax.layout.spec import F16_MAX
from kvjax.layout.spec import F32_RANGE_MAX
from kvjax.layout.spec import FP8_MAX
from kvjax.layout.spec import KINDS
from kvjax.layout.spec import LOG8_BIAS
from kvjax.layout.spec import LOG8_STEP_VALUES
from kvjax.layout.spec import LOG8_STEPS
from kvjax.layout.spec import LOG8_TABLE
from kvjax.layout.spec import QuantSpec
from kvjax.layout.spec import RANGE_MARGIN
from kvjax.layout.spec import SCALE_DTYPES
from kvjax.layout.spec import ZERO_DTYPES
from kvjax.layout.spec import ZERO_MAX
