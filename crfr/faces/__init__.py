"""Faces in images: decoding image bytes, finding faces (MTCNN), aligning them, and their alignment cache.

Shared by the data step (aligning training and evaluation faces) and serving (aligning a user's photo).
"""
