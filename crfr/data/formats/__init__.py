"""Face data formats, read and written: LFW and CFP folders, insightface RecordIO and ``.bin``, CSV pairs."""
