"""budget-lab tests: a package, so that test files can share helpers (tests/slurm_cluster.py)."""
