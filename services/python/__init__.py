"""Python service: Triton Python-backend models (``model.py``) on the shared serving kit."""
