from __future__ import annotations

import os
import socket
import uuid

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from libs.common.kafka import create_producer
from libs.common.kafka_topics import ensure_topics
from services.notify.settings import NotifySettings

SASL_BOOTSTRAP = os.environ.get("EHR_TEST_KAFKA_SASL", "127.0.0.1:19094")


def sasl_settings(password: str) -> NotifySettings:
    return NotifySettings(
        kafka_bootstrap_servers=SASL_BOOTSTRAP,
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="PLAIN",
        kafka_sasl_username="ehr-test",
        kafka_sasl_password=password,
    )


@pytest.fixture
def sasl_listener(infrastructure: None) -> None:
    host, port = SASL_BOOTSTRAP.rsplit(":", 1)
    with socket.socket() as sock:
        if sock.connect_ex((host, int(port))) != 0:
            pytest.fail(
                f"the broker has no SASL listener on {SASL_BOOTSTRAP}; restart it with"
                " `infra/kafka.sh stop && make infra` to pick up the current config"
            )


async def test_services_authenticate_to_kafka_with_sasl(sasl_listener: None) -> None:
    """With SASL settings, topic setup, producing and consuming all authenticate to the broker."""
    settings = sasl_settings("ehr-test-password")
    security = settings.kafka_security()
    topic = f"t{uuid.uuid4().hex[:10]}.sasl-check"
    await ensure_topics(SASL_BOOTSTRAP, [topic], 1, security=security)
    producer = create_producer(SASL_BOOTSTRAP, security)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"authenticated", key=b"k")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=SASL_BOOTSTRAP,
        auto_offset_reset="earliest",
        group_id=f"g{uuid.uuid4().hex}",
        **security,
    )
    await consumer.start()
    try:
        record = await consumer.getone()
        assert record.value == b"authenticated"
    finally:
        await consumer.stop()
        admin = AIOKafkaAdminClient(bootstrap_servers=SASL_BOOTSTRAP, **security)
        await admin.start()
        await admin.delete_topics([topic])
        await admin.close()


async def test_wrong_kafka_password_is_refused(sasl_listener: None) -> None:
    """A service with the wrong SASL password cannot connect at all."""
    producer = create_producer(SASL_BOOTSTRAP, sasl_settings("wrong").kafka_security())
    with pytest.raises(KafkaError):
        await producer.start()
    await producer.stop()


def test_sasl_without_a_username_is_a_configuration_error() -> None:
    """SASL with no user name fails at start, not at the first message."""
    settings = NotifySettings(kafka_security_protocol="SASL_SSL")
    with pytest.raises(ValueError, match="SASL_USERNAME"):
        settings.kafka_security()


def test_tls_uses_verification_with_the_configured_ca() -> None:
    """SASL_SSL builds a verifying TLS context; no option turns verification off."""
    security = NotifySettings(
        kafka_security_protocol="SASL_SSL", kafka_sasl_username="svc", kafka_sasl_password="p"
    ).kafka_security()
    context = security["ssl_context"]
    assert context.check_hostname is True
    assert security["sasl_mechanism"] == "SCRAM-SHA-512"
