"""Data: sources -> mining -> splits -> TFDS array_record (builder) + token store -> pipeline;
prepared.py keeps the preparation on disk."""
