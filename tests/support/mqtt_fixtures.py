"""Real Mosquitto brokers for tests: the shared one on 1883, and private ones that can restart."""

from __future__ import annotations

import contextlib
import getpass
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest
from paho.mqtt import client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

SHARED_HOST = "127.0.0.1"
SHARED_PORT = 1883
_START_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int


def port_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PrivateBroker:
    """A mosquitto process of its own, restartable on the same port and persistence dir."""

    directory: Path
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> BrokerAddress:
        return BrokerAddress(self.host, self.port)

    @property
    def log_path(self) -> Path:
        return self.directory / "mosquitto.log"

    def _write_config(self) -> Path:
        data = self.directory / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.directory / "mosquitto.conf"
        config.write_text(
            "\n".join(
                [
                    f"listener {self.port} {self.host}",
                    "allow_anonymous true",
                    "persistence true",
                    f"persistence_location {data}/",
                    "autosave_interval 1",
                    "max_queued_messages 100000",
                    # Running as root, mosquitto would switch to a user that cannot write here.
                    f"user {getpass.getuser()}",
                    f"log_dest file {self.log_path}",
                    "log_type all",
                    "",
                ]
            )
        )
        return config

    def start(self) -> None:
        """Start (again) and return once the port accepts connections."""
        if self.process is not None and self.process.poll() is None:
            return
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.process = subprocess.Popen(
            [mosquitto, "-c", str(self._write_config())],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not port_answers(self.host, self.port):
            if self.process.poll() is not None:
                pytest.fail(f"mosquitto exited with {self.process.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"mosquitto did not listen on {self.port}: {self.log_tail()}")
            time.sleep(0.01)  # polling the port: there is no event to await

    def stop(self) -> None:
        """Graceful stop: mosquitto saves sessions and queued messages before it exits."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """Crash: SIGKILL, only what was autosaved survives."""
        self._end(signal.SIGKILL)

    def _end(self, sig: signal.Signals) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def redeliveries_to(self, client_id: str) -> list[int]:
        """For each connection of `client_id` in turn, how many PUBLISHes the broker sent it
        again (DUP set): what its session held unacknowledged from the connection before."""
        counts: list[int] = []
        with contextlib.suppress(OSError):
            for line in self.log_path.read_text().splitlines():
                if "New client connected" in line and f" as {client_id} (" in line:
                    counts.append(0)
                elif f"Sending PUBLISH to {client_id} (d1," in line and counts:
                    counts[-1] += 1
        return counts

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        return "(no log)"


@pytest.fixture(scope="session")
def mqtt_broker() -> BrokerAddress:
    """The shared broker that the test command starts with scripts/ensure-mosquitto."""
    if not port_answers(SHARED_HOST, SHARED_PORT):
        pytest.skip(
            f"no MQTT broker on {SHARED_HOST}:{SHARED_PORT}; run scripts/ensure-mosquitto first"
        )
    return BrokerAddress(SHARED_HOST, SHARED_PORT)


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[Callable[[], PrivateBroker]]:
    """Factory of started private brokers, each with its own port and persistence dir."""
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        pytest.skip("mosquitto is not installed; run scripts/ensure-mosquitto first")
    brokers: list[PrivateBroker] = []

    def make() -> PrivateBroker:
        broker = PrivateBroker(tmp_path / f"broker-{len(brokers)}")
        brokers.append(broker)
        broker.start()
        return broker

    yield make
    for broker in brokers:
        broker.kill()


@contextmanager
def mqtt_publisher(broker: PrivateBroker, client_id: str) -> Iterator[mqtt.Client]:
    """A plain paho publisher (MQTT v5) with its network loop in a thread."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        yield client
    finally:
        client.disconnect()
        client.loop_stop()


def publish_products(client: mqtt.Client, topic: str, ids: list[str]) -> None:
    """Publish QoS 1 and return once the broker acknowledged every message (it owns them)."""
    infos = [
        client.publish(topic, orjson.dumps({"id": i, "product": {"title": i}}), qos=1) for i in ids
    ]
    for info in infos:
        info.wait_for_publish(timeout=5)
        assert info.is_published()
