"""Write the shipped math set: forge_lite/assets/math/{train,test}.jsonl.

Problems come from ``forge_lite.data.math_problems`` with fixed seeds, so
rerunning this script rewrites the same files byte for byte. The two splits
share no equation (``47 + 38 = 85`` is in one split at most), so a test score
is about arithmetic, not about having seen the problem.

    python scripts/make_math_dataset.py
"""

import json
from pathlib import Path

from forge_lite.assets import MATH_DATA_DIR
from forge_lite.data.math_problems import equation, generate_problems

TRAIN_SIZE, TEST_SIZE = 2000, 200
TRAIN_SEED, TEST_SEED = 1234, 4321


def write_jsonl(path: Path, problems: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(p) + "\n" for p in problems))


def main() -> None:
    out_dir = Path(MATH_DATA_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    test = generate_problems(TEST_SIZE, seed=TEST_SEED)
    train = generate_problems(TRAIN_SIZE, seed=TRAIN_SEED, exclude={equation(p) for p in test})
    write_jsonl(out_dir / "train.jsonl", train)
    write_jsonl(out_dir / "test.jsonl", test)
    print(f"wrote {len(train)} train and {len(test)} test problems to {out_dir}")


if __name__ == "__main__":
    main()
