"""Every file under a folder with its sha256 (a link: its target), as JSON: `python tree_hash.py DIR`.

Standalone, so a test can take it inside a mount namespace of its own, where the folder lives.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path


def tree_hash(root: Path) -> dict[str, str]:
    out = {}
    root = Path(root)
    if not root.exists():
        return out
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            out[rel] = f"link:{os.readlink(path)}" if path.is_symlink() else hashlib.sha256(path.read_bytes()).hexdigest()
    return dict(sorted(out.items()))


if __name__ == "__main__":
    json.dump(tree_hash(Path(sys.argv[1])), sys.stdout)
