"""Creates a SCRAM-SHA-256 user on a Kafka cluster with confluent-kafka's admin client
(AlterUserScramCredentials), logging in with SASL/PLAIN as an administrator, and creates TOPICs
(one partition each).

Usage: kafka_scram_user.py BOOTSTRAP USER PASSWORD [TOPIC...]
"""

import sys

from confluent_kafka.admin import (
    NewTopic,
    AdminClient,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialUpsertion,
)

bootstrap, user, password = sys.argv[1:4]
topics = sys.argv[4:]
admin = AdminClient(
    {
        "bootstrap.servers": bootstrap,
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": "PLAIN",
        "sasl.username": "admin",
        "sasl.password": "admin",
    }
)
upsert = UserScramCredentialUpsertion(
    user, ScramCredentialInfo(ScramMechanism.SCRAM_SHA_256, 4096), password.encode()
)
for name, future in admin.alter_user_scram_credentials([upsert]).items():
    future.result(timeout=30)
    print(f"created SCRAM-SHA-256 credentials for {name}")
if topics:
    for name, future in admin.create_topics([NewTopic(t, 1, 1) for t in topics]).items():
        future.result(timeout=30)
        print(f"created topic {name}")
