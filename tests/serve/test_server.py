"""Sessions over loopback: pipelines, dependency store, faults, TLS, draining."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import ismrmrd
import numpy as np
import pytest

from qmrkit import fit, models
from qmrkit.pipelines import fit_maps
from qmrkit.serve import DirectoryStore, Limits, exchange, register
from qmrkit.serve.mrd_images import image_to_array
from qmrkit.serve.protocol import encode_close, encode_config_file, encode_text
from qmrkit.sim import MOLLI_TI, molli_series

from .helpers import BackgroundServer, header_xml, raw_session, series_images


def _molli(seed=0, shape=(12, 10)):
    t1 = np.random.default_rng(seed).uniform(500, 1800, shape)
    series, _ = molli_series(t1, 1000.0, MOLLI_TI, snr=80, seed=seed)
    return series.astype(np.float32)


def _maps_by_name(images):
    out = {}
    for im in images:
        name = im.meta["SeriesDescription"]
        out[name[0] if isinstance(name, list) else name] = image_to_array(im)
    return out


def test_fit_session_equals_fit_lm_in_process():
    series = _molli()
    images = series_images(series)
    for im in images:  # the series' geometry, which the maps must carry
        im.field_of_view[:] = [240.0, 200.0, 6.0]
        im.position[:] = [3.0, -4.0, 12.5]
        im.slice_dir[:] = [0.0, 1.0, 0.0]
    with BackgroundServer() as srv:
        reply = asyncio.run(
            exchange(
                "127.0.0.1",
                srv.port,
                config="fit:molli",
                header_xml=header_xml(ti=MOLLI_TI),
                images=images,
            )
        )
    assert not reply.errors, reply.texts
    maps = _maps_by_name(reply.images)
    # the reference is the solver itself, called here: fit.lm on the same series and model
    direct = fit.lm(models.MolliT1(list(MOLLI_TI)), series, progress=False)
    assert set(direct.maps) == {"A", "B", "T1star", "T1"}
    for name, stem in direct.map_names.items():
        ref = np.nan_to_num(direct.maps[name].numpy())
        np.testing.assert_allclose(maps[f"qmrkit_{stem}"], ref, rtol=1e-6, atol=1e-6, err_msg=name)
    truth = np.random.default_rng(0).uniform(500, 1800, (12, 10))
    assert np.median(np.abs(maps["qmrkit_T1map"] / truth - 1)) < 0.05  # a real fit, not zeros
    im = reply.images[0]
    assert im.meta["DataRole"] == "Quantitative" and im.data_type == ismrmrd.DATATYPE_FLOAT
    for m in reply.images:
        assert list(m.field_of_view) == [240.0, 200.0, 6.0] and list(m.position) == [
            3.0,
            -4.0,
            12.5,
        ]
        assert list(m.slice_dir) == [0.0, 1.0, 0.0] and tuple(m.matrix_size) == (12, 10, 1)
    assert any("voxels" in t for t in reply.texts)


def test_null_unknown_config_and_json_override():
    with BackgroundServer() as srv:
        r = asyncio.run(exchange("127.0.0.1", srv.port, config="null", header_xml=header_xml()))
        assert r.texts and "null pipeline" in r.texts[0]
        r = asyncio.run(exchange("127.0.0.1", srv.port, config="bogus", header_xml=header_xml()))
        assert r.errors and "unknown config 'bogus'" in r.errors[0]
        series = _molli(shape=(4, 4))
        r = asyncio.run(
            exchange(
                "127.0.0.1",
                srv.port,
                config="default.xml",
                header_xml=header_xml(ti=MOLLI_TI),
                images=series_images(series),
                parameters={"config": "fit:molli"},
            )
        )
        assert not r.errors and len(r.images) >= 4


def _raw_session(port, payload: bytes, read=True, timeout=10.0) -> bytes:
    return raw_session(port, payload, read=read, timeout=timeout)


def test_faults_never_hurt_a_concurrent_good_client():
    series = _molli(seed=2)
    with BackgroundServer(
        limits=Limits(read_timeout=1.0, max_text_bytes=1 << 20), max_concurrent=2
    ) as srv:

        async def good():
            return await exchange(
                "127.0.0.1",
                srv.port,
                config="fit:molli",
                header_xml=header_xml(ti=MOLLI_TI),
                images=series_images(series),
            )

        async def scenario():
            task = asyncio.create_task(good())
            loop = asyncio.get_running_loop()
            bad = [
                b"\x07\x00garbage",  # unknown id
                encode_config_file("null") + b"\x05\x00\xff\xff\xff\x7f",  # oversized text
                encode_config_file("null") + b"\x05\x00\x10\x00\x00\x00abc",  # truncated, then EOF
                os.urandom(4096),  # garbage bytes
                encode_config_file("null")
                + encode_text("<not xml", mid=3)
                + encode_close(),  # bad header
            ]
            replies = await asyncio.gather(
                *[loop.run_in_executor(None, _raw_session, srv.port, b) for b in bad]
            )
            # a client that stalls mid-message, and one that disconnects mid-scan
            stall = socket.create_connection(("127.0.0.1", srv.port))
            stall.sendall(encode_config_file("null") + b"\x05\x00\x10\x00")
            gone = socket.create_connection(("127.0.0.1", srv.port))
            gone.sendall(
                encode_config_file("fit:molli") + encode_text(header_xml(ti=MOLLI_TI), mid=3)
            )
            gone.close()
            reply = await task
            await asyncio.sleep(1.5)  # the stalled one times out
            stall.close()
            return replies, reply

        replies, reply = asyncio.run(scenario())
        for r in replies[:2]:
            assert b"protocol error" in r and r.endswith(b"\x04\x00")
        assert b"MRD header is not valid" in replies[4]
        assert not reply.errors
        ref = fit_maps(series, "molli", {"ti": list(MOLLI_TI)}, mask="auto")
        np.testing.assert_allclose(
            _maps_by_name(reply.images)["qmrkit_T1map"], np.nan_to_num(ref["T1"].numpy()), rtol=1e-6
        )
        text = srv.server.metrics.exposition().decode()
        assert (
            'qmrkit_errors_total{kind="protocol"}' in text
            and "qmrkit_reconstruction_duration_seconds" in text
        )
        # and the server still answers
        r = asyncio.run(exchange("127.0.0.1", srv.port, config="null", header_xml=header_xml()))
        assert "null pipeline" in r.texts[0]


def test_pipeline_exception_is_reported_not_fatal():
    @register("boom-test")
    def boom(session, arg):
        raise RuntimeError("kaboom")

    with BackgroundServer() as srv:
        r = asyncio.run(
            exchange("127.0.0.1", srv.port, config="boom-test", header_xml=header_xml())
        )
        assert r.errors and "kaboom" in r.errors[0]
        r = asyncio.run(exchange("127.0.0.1", srv.port, config="null", header_xml=header_xml()))
        assert "null pipeline" in r.texts[0]


def test_b1_dependency_reaches_a_later_scan_and_another_server(tmp_path):
    from qmrkit import models

    rng = np.random.default_rng(5)
    shape = (8, 6)
    b1 = rng.uniform(0.7, 1.3, shape).astype(np.float32)
    t1 = rng.uniform(600, 1800, shape)
    fa, tr = [3.0, 8.0, 15.0, 20.0], 15.0
    series = (
        models.VfaT1(fa, tr, b1=b1)
        .simulate({"M0": np.full(shape, 3000.0), "T1": t1})
        .numpy()
        .astype(np.float32)
    )
    hdr_b1 = header_xml(measurement="B1-7", matrix=(8, 6, 1))
    hdr_vfa = header_xml(tr=[tr], flip=fa, measurement="VFA-8", dependencies=[("B1map", "B1-7")])
    with BackgroundServer(store=DirectoryStore(tmp_path)) as srv:
        r = asyncio.run(
            exchange(
                "127.0.0.1",
                srv.port,
                config="store-b1",
                header_xml=hdr_b1,
                images=series_images(b1[..., None]),
            )
        )
        assert not r.errors and "stored a B1 map" in r.texts[0]
        r = asyncio.run(
            exchange(
                "127.0.0.1",
                srv.port,
                config="fit:vfa",
                header_xml=hdr_vfa,
                images=series_images(series),
            )
        )
    assert "using the stored B1 map" in r.texts
    est = _maps_by_name(r.images)["qmrkit_T1map"]
    np.testing.assert_allclose(est, t1, rtol=1e-3)
    # a second server sharing the store directory (another replica) finds it too
    with BackgroundServer(store=DirectoryStore(tmp_path)) as srv2:
        r2 = asyncio.run(
            exchange(
                "127.0.0.1",
                srv2.port,
                config="fit:vfa",
                header_xml=hdr_vfa,
                images=series_images(series),
            )
        )
    np.testing.assert_allclose(_maps_by_name(r2.images)["qmrkit_T1map"], t1, rtol=1e-3)
    # without the B1 map the fit is biased: the dependency mattered
    with BackgroundServer() as srv3:
        r3 = asyncio.run(
            exchange(
                "127.0.0.1",
                srv3.port,
                config="fit:vfa",
                header_xml=hdr_vfa,
                images=series_images(series),
            )
        )
    assert np.median(np.abs(_maps_by_name(r3.images)["qmrkit_T1map"] - t1) / t1) > 0.05


def test_store_ttl_and_keys(tmp_path):
    from qmrkit.serve.store import DependencyKey

    store = DirectoryStore(tmp_path)
    k = DependencyKey("P1", "D1", "S1")
    store.put(k, "noise", "m1", {"sigma": np.ones(3)}, ttl_s=0.05)
    store.put(k, "noise", "m2", {"sigma": np.full(3, 2.0)})
    assert store.get(k, "noise", "m1").arrays["sigma"][0] == 1.0
    assert store.get(k, "noise").measurement_id == "m2"  # newest
    assert store.get(DependencyKey("P2", "D1", "S1"), "noise") is None
    time.sleep(0.1)
    assert store.get(k, "noise", "m1") is None and store.purge_expired() == 1
    assert all("P1" not in p.name for p in tmp_path.rglob("*"))  # identifiers never in file names


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port, proc, timeout=60):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(proc.stdout.read())
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError("server did not start")


@pytest.mark.slow
def test_sigterm_drains_in_flight_scan(tmp_path):
    """SIGTERM during a reconstruction: the scan still completes; new connections are refused."""

    @register("sleep-test")
    def _(session, arg):  # registered here only; the subprocess uses its own registry
        return []

    port = _free_port()
    script = tmp_path / "srv.py"
    script.write_text(
        "import time\nfrom qmrkit.serve import register\nfrom qmrkit.cli import main\n"
        "@register('slow')\ndef slow(session, arg):\n    time.sleep(2.0)\n    return ['slow done']\n"
        f"raise SystemExit(main(['serve', '--port', '{port}', '--grace', '30']))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        _wait_port(port, proc)

        async def go():
            task = asyncio.create_task(
                exchange("127.0.0.1", port, config="slow", header_xml=header_xml())
            )
            await asyncio.sleep(0.8)
            proc.send_signal(signal.SIGTERM)
            return await task

        reply = asyncio.run(go())
        assert "slow done" in reply.texts
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def _make_certs(d):
    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=qmrkit-test-ca",
    )
    for name in ("server", "client"):
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
        )
        ext = d / f"{name}.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            str(ext),
        )
    # a client certificate from an unrelated CA
    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "rogue.key",
        "-out",
        "rogue.pem",
        "-days",
        "2",
        "-subj",
        "/CN=rogue",
    )


def test_mutual_tls(tmp_path):
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("openssl command not available to make test certificates")
    from qmrkit.serve import client_tls_context, tls_context

    _make_certs(tmp_path)
    sctx = tls_context(tmp_path / "server.pem", tmp_path / "server.key", tmp_path / "ca.pem")
    with BackgroundServer(ssl_context=sctx) as srv:
        good = client_tls_context(
            tmp_path / "client.pem", tmp_path / "client.key", tmp_path / "ca.pem"
        )
        r = asyncio.run(
            exchange(
                "127.0.0.1", srv.port, config="null", header_xml=header_xml(), ssl_context=good
            )
        )
        assert "null pipeline" in r.texts[0]
        rogue = client_tls_context(
            tmp_path / "rogue.pem", tmp_path / "rogue.key", tmp_path / "ca.pem"
        )
        nocert = client_tls_context(None, None, tmp_path / "ca.pem")
        import ssl

        from qmrkit.errors import ProtocolError

        refused = 0
        for ctx in (rogue, nocert):
            try:
                r = asyncio.run(
                    exchange(
                        "127.0.0.1",
                        srv.port,
                        config="null",
                        header_xml=header_xml(),
                        ssl_context=ctx,
                    )
                )
            except (ssl.SSLError, ConnectionError, OSError, EOFError, ProtocolError):
                refused += 1
                continue
            assert not r.texts, "a client without a valid certificate was served"
            refused += 1
        assert refused == 2
