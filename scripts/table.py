"""Print the paper's Table 1 (test error %, distorted MNIST) from a sweep's run folders.

    python scripts/table.py outputs/multirun/2026-11-23/12-00-00
"""

import argparse

from stn.results import collect_runs, results_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a multirun folder (or any folder holding Hydra job folders)")
    args = parser.parse_args()
    print(results_table(collect_runs(args.folder)))


if __name__ == "__main__":
    main()
