"""NATS JetStream: names (`names`), message schemas (`messages`) and setup (`setup`)."""
