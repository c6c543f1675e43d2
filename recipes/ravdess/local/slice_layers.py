"""Cut each layer of a stacked-layer store (``-f whisper:layer=all``) out as a plain store.

    python recipes/ravdess/local/slice_layers.py FEATS/whisper.h5 [OUT_DIR]

Writes OUT_DIR/<name>_l<k>.h5 (default OUT_DIR: the store's folder) for every layer k the store
stacks, with the attributes the extractor writes for ``layer=k`` (so `sertool predict` rebuilds
exactly that layer): the per-layer probe rows of RESULTS.md without one extraction per layer.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

from sertool.store import StoreWriter, open_store


def main() -> None:
    src_path = Path(sys.argv[1])
    out_dir = Path(sys.argv[2]) if len(sys.argv) > 2 else src_path.parent
    src = open_store(src_path)
    layers, width = src.attrs.get("layers"), src.attrs.get("layer_dim")
    if not isinstance(layers, list) or len(layers) < 2 or int(width) * len(layers) != int(src.attrs["dim"]):
        sys.exit(f"{src_path}: not a stacked-layer store (attrs layers/layer_dim)")
    name = src.attrs["feature"]
    for pos, layer in enumerate(layers):
        attrs = copy.deepcopy(dict(src.attrs))
        attrs.update(feature=f"{name}_l{layer}", dim=int(width), layers=[layer], combine="mean")
        attrs["extractor"]["params"].update(layer=layer, combine="mean")
        with StoreWriter(out_dir / f"{name}_l{layer}.h5", attrs) as w:
            for uid in src.ids:
                w.add(uid, src[uid][:, pos * width : (pos + 1) * width])
        print(f"{out_dir / f'{name}_l{layer}.h5'}: layer {layer}")


if __name__ == "__main__":
    main()
