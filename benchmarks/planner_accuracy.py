"""The resource planner against measurements: GPU memory on an H200, disk on the tiny preset.

GPU: every configuration of tests/gpu/memory_probe.py (measured into
tests/fixtures/gpu_memory_h200.json: one megatron-core training step, TP = PP = EP = 1, the
local spec's unfused attention) next to the planner's prediction for the same model and layout.
The measurement is the larger of the forward+backward peak and the optimizer step's peak
(`torch.cuda.max_memory_allocated`; torch's AdamW there, whose temporaries the planner models
for that machine only). Production's flash attention keeps no score matrix; the planner models
that path separately (glmsnake/resources/training.py).

    python benchmarks/planner_accuracy.py            # the table and the worst error
    python benchmarks/planner_accuracy.py --record   # also rewrite tests/fixtures/gpu_memory_predictions.json
    python benchmarks/planner_accuracy.py --disk BASE_DIR   # predicted vs real sizes of a finished tiny run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MEASURED = ROOT / "tests" / "fixtures" / "gpu_memory_h200.json"
RECORDED = ROOT / "tests" / "fixtures" / "gpu_memory_predictions.json"


def gpu_rows() -> list[dict]:
    from glmsnake.resources.shapes import ModelShape, TrainLayout
    from glmsnake.resources.training import peak_allocated

    doc = json.loads(MEASURED.read_text())
    rows = []
    for name, e in doc["results"].items():
        p = e["probe"]
        measured = max(e["peak_fwd_bwd"], e["peak_optimizer"])
        predicted = peak_allocated(ModelShape.of_probe(p), TrainLayout.of_probe(p))
        kind = f"{'MoE' if p['num_experts'] else 'dense'} {e['params'] / 1e9:.2f}B, {p['seq_length']} tokens, " \
               f"recompute {p['recompute']}, MTP {'on' if p['mtp_num_layers'] else 'off'}"
        rows.append({"name": name, "config": kind, "measured": measured, "predicted": predicted,
                     "error": (predicted - measured) / measured})
    return rows


def disk_rows(base: Path) -> list[dict]:
    from glmsnake import disk, resolve
    from glmsnake.resources import storage

    wf = resolve.load({"base_dir": str(base)})
    m, paths, run = wf.preset.model, wf.paths, next(iter(wf.runs.values()))
    ck = paths.run(run.name).checkpoints
    newest = max(ck.glob("iter_*"))
    pairs = {
        "HF weights": (paths.hf_dir, storage.hf_bytes(m)),
        "torch_dist": (paths.torch_dist_dir, storage.torch_dist_bytes(m)),
        "FP8 weights": (paths.fp8_dir, storage.fp8_bytes(m, wf.preset.convert.fp8.block_size)),
        "one checkpoint": (newest, storage.checkpoint_bytes(m, run)),
        "HF export": (paths.run(run.name).hf, storage.hf_bytes(m)),
    }
    out = []
    for what, (folder, predicted) in pairs.items():
        real = disk.bytes_under(folder)
        out.append({"name": what, "measured": real, "predicted": predicted, "error": (predicted - real) / real})
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--disk", type=Path, help="base_dir of a finished tiny run")
    args = ap.parse_args()
    rows = gpu_rows()
    doc = json.loads(MEASURED.read_text())
    print(f"GPU memory of one training step on {doc['device']} ({', '.join(f'{k} {v}' for k, v in doc['versions'].items())})")
    print(f"{'config':<74}{'predicted GB':>14}{'measured GB':>13}{'error':>8}")
    for r in rows:
        print(f"{r['name'] + ': ' + r['config']:<74}{r['predicted'] / 1e9:>14.2f}{r['measured'] / 1e9:>13.2f}{r['error']:>+8.1%}")
    print(f"worst |error|: {max(abs(r['error']) for r in rows):.1%} over {len(rows)} configurations (target: 15%)")
    if args.record:
        RECORDED.write_text(json.dumps({r["name"]: round(r["predicted"]) for r in rows}, indent=1) + "\n")
        print(f"recorded the predictions in {RECORDED.relative_to(ROOT)}")
    if args.disk:
        print(f"\nDisk of the tiny preset under {args.disk}")
        for r in disk_rows(args.disk):
            print(f"{r['name']:<20}{r['predicted']:>14,.0f}{r['measured']:>14,.0f}{r['error']:>+8.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
