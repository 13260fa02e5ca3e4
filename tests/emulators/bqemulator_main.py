"""Starts bqemulator (`bqemulator start ...`) without DuckDB's spatial extension.

bqemulator loads DuckDB's ``spatial`` extension at start-up for GEOGRAPHY and
fails when it cannot download it; the extension repository is not reachable
from these machines and no pip package bundles it for DuckDB 2.x. medtwin has
no GEOGRAPHY column, so this launcher makes that one load best-effort (as
bqemulator already does for its ``avro`` extension) and then runs the
emulator's own command line unchanged. Run with the emulator's interpreter:
``.emulators/venv/bin/python tests/emulators/bqemulator_main.py start --rest-port P ...``.
"""

import logging

from bqemulator.cli import main
from bqemulator.storage.engine import DuckDBEngine

_load_spatial = DuckDBEngine._load_spatial


def _load_spatial_if_available(self) -> None:
    try:
        _load_spatial(self)
    except Exception as error:  # noqa: BLE001 - GEOGRAPHY is unused by medtwin
        logging.getLogger("bqemulator").warning("spatial extension unavailable, GEOGRAPHY off: %s", error)


DuckDBEngine._load_spatial = _load_spatial_if_available

if __name__ == "__main__":
    main()
