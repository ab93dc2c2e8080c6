"""The prepare step: face sources read (``formats``), split leak-free by identity, aligned, written as shards and
pair sets; plus checking, exporting and downloading data."""
