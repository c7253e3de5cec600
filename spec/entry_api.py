"""Frozen entry point of `api`."""

import multiprocessing

if __name__ == "__main__":
    # hypercorn with WORKERS > 1 spawns worker processes: in a frozen binary each one re-runs
    # this executable, and freeze_support() turns that run into the worker.
    multiprocessing.freeze_support()
    from app.admin.cli import api

    api(prog_name="api")
