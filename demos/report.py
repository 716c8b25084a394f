"""Print what the pipeline produced: the metrics table, the champions, and where the samples are.

python -m demos.report      (run by `make demo` after `dvc repro`)
"""

from __future__ import annotations

import json
from pathlib import Path


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def main() -> None:
    tokenizer = load(Path("metrics/tokenizer.json"))
    generation = load(Path("metrics/generation.json"))
    reference = load(Path("metrics/reference.json"))
    if not tokenizer:
        raise SystemExit("metrics/tokenizer.json is missing: run `dvc repro` first")
    print("\nTokenizer on the val split")
    for name in ("psnr", "ssim", "codebook_usage_pct", "perplexity", "codes_used", "codebook_size"):
        if name in tokenizer:
            print(f"  {name:>20}: {tokenizer[name]:.4g}")
    for name in sorted(k for k in tokenizer if k.startswith("rfid")):
        print(f"  {name:>20}: {tokenizer[name]:.4g}")
    names = sorted(k for k in generation if k.startswith(("fid", "precision", "recall")))
    if names:
        print("\nSamples against the val split, beside the reference rows")
        print("  " + f"{'row':<24}" + "".join(f"{name:>18}" for name in names))
        rows = [("prior samples", generation)] + [
            (key, reference.get(key, {})) for key in ("val_half_vs_half", "val_vs_train")
        ]
        for label, values in rows:
            print(
                "  " + f"{label:<24}" + "".join(f"{values.get(name, float('nan')):>18.4g}" for name in names)
            )
        if "class_accuracy" in generation:
            print(
                f"\n  class accuracy of the samples (domain classifier): {generation['class_accuracy']:.3f}"
            )
    features = load(Path("reports/evaluate_tokenizer.json")).get("features", {})
    for name, why in features.get("skipped", {}).items():
        print(f"\n  features not used: {name}: {why[:160]}")
    grid = Path("reports/samples.png")
    print(
        f"\nSample grid (one row per class): {grid.resolve()}" if grid.is_file() else "\nno sample grid yet"
    )
    print("Browse runs and the model registry: make ui  (it prints the link to the training runs)")


if __name__ == "__main__":
    main()
