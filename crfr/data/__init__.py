"""Face data: sources (LFW folders, insightface RecordIO and .bin, CSV pairs), alignment, prepared shards."""
