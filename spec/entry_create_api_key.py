"""Frozen entry point of `create_api_key`."""

import multiprocessing

if __name__ == "__main__":
    multiprocessing.freeze_support()
    from app.admin.cli import create_api_key

    create_api_key(prog_name="create_api_key")
