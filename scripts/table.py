"""Print the paper's Table 1 (test error %, distorted MNIST) and what the transformers learned.

The second table is the canonicalisation table: the share of each distortion's spread of pose (angle /
log-scale / shift, and the non-similar residual for p and e) left after the transformer on the test set.

    python scripts/table.py outputs/multirun/2026-11-23/12-00-00
"""

import argparse
import sys

from stn.errors import UserError
from stn.results import collect_runs, pose_table, results_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a multirun folder (or any folder holding Hydra job folders)")
    args = parser.parse_args()
    try:
        runs = collect_runs(args.folder)
    except UserError as error:
        sys.exit(f"Error: {error}")
    print("Test error (%):\n")
    print(results_table(runs))
    print("\nDistortion left after the transformer (test set; angle / log-scale / shift, 1 = identity, 0 = all in one pose):\n")
    print(pose_table(runs))


if __name__ == "__main__":
    main()
