"""Code generated from proto/ensync.proto by `make proto`. Do not edit."""
