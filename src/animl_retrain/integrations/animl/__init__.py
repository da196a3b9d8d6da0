"""Animl: its GraphQL API (login, export tasks) and the ``MLModel`` record a deployed classifier needs."""
