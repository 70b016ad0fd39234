"""NATS JetStream: subjects, streams and consumers, and the embedded nats-server."""
