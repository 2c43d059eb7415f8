"""Framework integrations, each a client of the live API (Converse) in the framework's own process."""
