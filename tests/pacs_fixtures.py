"""A real PACS for the tests: one Orthanc (Debian's package, `make orthanc`) per test session.

`orthanc` starts it on a free loopback port with a temporary storage folder and a generated JSON
configuration: the DICOMweb plugin loaded, HTTP basic authentication with a generated password,
no DICOM port, no remote access. The password reaches the code under test only through a
credentials file (``file:`` reference, mode 600). Nothing is skipped: without `make orthanc`
the fixture fails.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import secrets
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INSTALL = ROOT / ".runners" / "orthanc"
USER = "medtwin"


@dataclasses.dataclass(frozen=True)
class Orthanc:
    url: str  # http://127.0.0.1:PORT
    dicomweb: str  # the DICOMweb root, url + /dicom-web
    password: str
    credentials_file: str  # "medtwin:<password>", mode 600

    @property
    def credentials(self) -> str:
        return f"file:{self.credentials_file}"

    def get(self, path: str, accept: str = "application/json") -> bytes:
        """GET `path` (under url) with the credentials; the raw body."""
        token = base64.b64encode(f"{USER}:{self.password}".encode()).decode()
        request = urllib.request.Request(self.url + path, headers={"Authorization": f"Basic {token}",
                                                                   "Accept": accept})
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    binary = INSTALL / "root" / "usr" / "sbin" / "Orthanc"
    if not binary.is_file():
        pytest.fail("Orthanc is not installed: run `make orthanc` (a prerequisite of `make test`)")
    home = tmp_path_factory.mktemp("orthanc")
    port, password = free_port(), secrets.token_urlsafe(18)
    plugin = next((INSTALL / "root" / "usr" / "lib" / "orthanc").glob("libOrthancDicomWeb.so.*"))
    config = home / "orthanc.json"
    config.write_text(json.dumps({
        "Name": "medtwin-tests", "StorageDirectory": str(home / "storage"), "IndexDirectory": str(home / "storage"),
        "HttpPort": port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True, "RegisteredUsers": {USER: password}, "HttpCompressionEnabled": False,
        "Plugins": [str(plugin)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}))
    os.chmod(config, 0o600)
    credentials = home / "credentials"
    credentials.write_text(f"{USER}:{password}\n")
    os.chmod(credentials, 0o600)
    log = open(home / "orthanc.log", "wb")
    process = subprocess.Popen([str(ROOT / "launch" / "orthanc.sh"), "run", str(config), str(INSTALL)],
                               stdout=log, stderr=subprocess.STDOUT)
    server = Orthanc(url=f"http://127.0.0.1:{port}", dicomweb=f"http://127.0.0.1:{port}/dicom-web",
                     password=password, credentials_file=str(credentials))
    deadline = time.monotonic() + 60
    while True:
        try:
            server.get("/system")
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"Orthanc did not start: {(home / 'orthanc.log').read_text()[-2000:]}")
            time.sleep(0.2)
    yield server
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()
