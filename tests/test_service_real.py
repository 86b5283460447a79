"""The service with real parts: a PostgreSQL server and a headless Chromium driving the page at /.

Each test starts and stops its own server; where PostgreSQL or Chromium is not installed (the
project's CI installs both from the machine's package registry) they skip with the reason."""
import glob
import io
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the service needs fastapi, uvicorn and sqlalchemy")

from occface.service import FaceService  # noqa: E402
from occface.service.app import create_app  # noqa: E402

from test_service import enrol, face_png, tiny_model  # noqa: E402


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def postgres_binaries() -> str | None:
    for candidate in [shutil.which("initdb"), *sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)]:
        if candidate and os.access(candidate, os.X_OK):
            return os.path.dirname(os.path.realpath(candidate))
    return None


@pytest.fixture
def postgres_url():
    """A PostgreSQL server of its own (a fresh cluster on a Unix socket), stopped afterwards."""
    pytest.importorskip("psycopg", reason="psycopg not installed (pip install 'occface[serve]')")
    binaries = postgres_binaries()
    if binaries is None:
        pytest.skip("PostgreSQL's server (initdb, pg_ctl) not installed: apt-get install postgresql")
    root = tempfile.mkdtemp(prefix="occface-pg-", dir="/tmp")
    data, sockets = os.path.join(root, "data"), os.path.join(root, "run")
    os.makedirs(sockets)
    prefix: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: as its own user
        import pwd

        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run PostgreSQL as")
        for path in (root, sockets):
            os.chown(path, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    port = free_port()

    def run(*command: str) -> None:
        subprocess.run([*prefix, *command], check=True, capture_output=True, timeout=120)

    run(f"{binaries}/initdb", "-D", data, "--auth=trust", "-U", "occface", "-E", "UTF8")
    run(f"{binaries}/pg_ctl", "-D", data, "-w", "-l", os.path.join(root, "log"), "-o",
        f"-k {sockets} -p {port} -c listen_addresses=''", "start")
    try:
        run(f"{binaries}/createdb", "-h", sockets, "-p", str(port), "-U", "occface", "occface")
        yield f"postgresql+psycopg://occface@/occface?host={sockets}&port={port}"
    finally:
        subprocess.run([*prefix, f"{binaries}/pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True,
                       timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def test_subjects_and_faces_in_postgresql_survive_a_crash(postgres_url, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from occface.service.database import Database

    model_dir = tiny_model(tmp_path / "model")
    service = FaceService(model_dir, gallery=tmp_path / "gallery", db=postgres_url)
    assert service.db.engine.dialect.name == "postgresql"
    client = TestClient(create_app(service))
    for subject, seed in (("ann", 1), ("ann", 2), ("bob", 3)):
        assert enrol(client, subject, seed).status_code == 201
    assert client.get("/v1/subjects").json()["total"] == 2
    assert client.get("/v1/info").json()["gallery"]["database"].startswith("postgresql")
    monkeypatch.setattr(Database, "add_faces", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):  # killed between the shard's commit and the rows'
        service.enroll("cid", np.asarray(Image.open(io.BytesIO(face_png(4)))))
    monkeypatch.undo()
    restarted = FaceService(model_dir, gallery=tmp_path / "gallery", db=postgres_url)
    assert restarted.db.counts() == (3, 4) and len(restarted.gallery) == 4
    assert {s["id"] for s in restarted.subjects()["subjects"]} == {"ann", "bob", "cid"}
    key = restarted.db.add_key("gate")
    client = TestClient(create_app(restarted))
    assert client.get("/v1/subjects").status_code == 401
    assert client.delete("/v1/subjects/ann", headers={"X-API-Key": key}).json()["removed_faces"] == 2
    assert restarted.db.counts() == (2, 2)


# ---------------------------------------------------------------- the page in a real browser
def chromium_paths() -> tuple[str, str] | None:
    browser = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture
def live_server(tmp_path):
    """The service on a free loopback port (uvicorn in a thread), with a calibrated tiny model."""
    import uvicorn

    from occface.models import OccFaceModel

    model_dir = tiny_model(tmp_path / "model")
    model = OccFaceModel.from_pretrained(model_dir)
    model.config.calibration = {  # thresholds as a trained model stores them, so the page has a decision
        "normalization": {"hidden_below": 0.2, "hidden_share": 0.25, "embedding": [0.5, 0.2], "qaconv": [0.0, 1.0],
                          "qaconv_weighted": [0.0, 1.0]},
        "fusion_weight": {"all": {"embedding": 1.0}},
        "embedding": {"far": 0.01, "threshold": 0.9}, "fused": {"far": 0.01, "threshold": 2.0}}
    model.save_pretrained(model_dir)
    service = FaceService(model_dir, gallery=tmp_path / "gallery")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_the_page_compares_two_photos_enrols_and_searches(live_server, tmp_path):
    paths = chromium_paths()
    if paths is None:
        pytest.skip("Chromium and ChromeDriver not installed: apt-get install chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install selenium)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    files = {}
    for name, seed in (("a", 1), ("b", 2)):
        files[name] = tmp_path / f"{name}.png"
        files[name].write_bytes(face_png(seed))
    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=paths[1]), options=options)
    try:
        driver.get(live_server + "/")
        assert "occface" in driver.title
        wait = WebDriverWait(driver, 30)
        driver.find_element(By.ID, "first").send_keys(str(files["a"]))
        driver.find_element(By.ID, "second").send_keys(str(files["a"]))
        driver.find_element(By.ID, "verify-button").click()
        wait.until(expected_conditions.visibility_of_element_located((By.ID, "verify-result")))
        assert driver.find_element(By.ID, "decision").text.startswith("Same person")
        images = driver.find_elements(By.CSS_SELECTOR, "#verify-faces img")
        assert len(images) == 2 and all(driver.execute_script("return arguments[0].naturalWidth", i) == 224
                                        for i in images)  # both visibility overlays decoded
        assert len(driver.find_elements(By.CSS_SELECTOR, "#scores tbody tr")) == 4
        assert "first:" in driver.find_element(By.ID, "stratum").text
        driver.find_element(By.ID, "second").send_keys(str(files["b"]))
        driver.find_element(By.ID, "verify-button").click()
        wait.until(lambda d: d.find_element(By.ID, "decision").text.startswith("Different people"))
        driver.find_element(By.ID, "enroll-subject").send_keys("ann")
        driver.find_element(By.ID, "enroll-image").send_keys(str(files["b"]))
        driver.find_element(By.ID, "enroll-button").click()
        wait.until(lambda d: "enrolled" in d.find_element(By.ID, "enroll-result").text)
        driver.find_element(By.ID, "search-image").send_keys(str(files["b"]))
        driver.find_element(By.ID, "search-button").click()
        wait.until(expected_conditions.visibility_of_element_located((By.ID, "search-result")))
        assert driver.find_element(By.ID, "search-decision").text == "Best match: ann"
        assert driver.find_element(By.CSS_SELECTOR, "#candidates tbody tr td:nth-child(2)").text == "ann"
        # A bad upload shows the server's one-line error on the page.
        broken = tmp_path / "broken.png"
        broken.write_bytes(b"not an image")
        driver.find_element(By.ID, "search-image").send_keys(str(broken))
        driver.find_element(By.ID, "search-button").click()
        wait.until(expected_conditions.visibility_of_element_located((By.ID, "error")))
        assert driver.find_element(By.ID, "error").text.startswith("422: image: not an image")
    finally:
        driver.quit()
