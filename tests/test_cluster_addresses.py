"""One machine attached twice is one host: addresses that reach the same
worker are refused at ``attach_cluster``, naming both spellings, before
anything is attached. (With a real worker: tests/test_hosts.py,
``check_one_worker_attached_twice_is_refused``.)"""

import socket

import pytest

import forge_lite
from forge_lite.controller.cluster import ClusterError
from forge_lite.worker import free_port


@pytest.fixture
def port():
    return free_port()


@pytest.mark.parametrize("other", [
    "tcp://localhost:{port}",          # a name that resolves to it
    "tcp://127.1:{port}",              # IPv4 written short
    "tcp://[::ffff:127.0.0.1]:{port}", # IPv4 inside IPv6
    "tcp://127.000.000.001:{port}",    # leading zeros
])
async def test_two_spellings_of_one_address_are_one_worker(port, other):
    first, second = f"tcp://127.0.0.1:{port}", other.format(port=port)
    with pytest.raises(ClusterError) as refused:
        await forge_lite.attach_cluster([first, second], timeout=5)
    message = str(refused.value)
    assert first in message and second in message and "same worker" in message
    assert forge_lite.cluster().is_local  # nothing attached


async def test_one_listener_on_every_address_is_one_worker(port):
    """A socket on 0.0.0.0:PORT answers at every address of this machine."""
    with socket.socket() as listener:
        listener.bind(("0.0.0.0", port))
        listener.listen()
        for other in (f"tcp://127.0.0.2:{port}", f"tcp://0.0.0.0:{port}"):
            with pytest.raises(ClusterError, match="listens on port .* for every address") as refused:
                await forge_lite.attach_cluster([f"tcp://127.0.0.1:{port}", other], timeout=5)
            assert other in str(refused.value)


async def test_different_workers_are_not_mistaken_for_one(port):
    """Another port, or another loopback address of a listener bound to one
    address, is another worker: refused only because nothing answers there."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen()
        for other in (f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.2:{port}"):
            with pytest.raises(ClusterError) as refused:
                await forge_lite.attach_cluster([other], timeout=5)
            assert "no worker answers" in str(refused.value) and "same worker" not in str(refused.value)
            with pytest.raises(ClusterError) as refused:
                await forge_lite.attach_cluster([f"tcp://127.0.0.1:{port}", other], timeout=5)
            assert "same worker" not in str(refused.value)
