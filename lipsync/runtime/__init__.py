"""Serving a model: the registry (which models are loaded where), the deadline scheduler, and the Stream and live
(Converse) session logic, with no knowledge of gRPC. Imports only model, codec and the foundation."""
