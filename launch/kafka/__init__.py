"""Kafka for the local runners and tests: build files (pom.xml, io/pom.xml) and `local` (start them)."""
