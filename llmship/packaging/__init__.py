"""Packaging of validated artifacts into the bundles app runtimes load (LiteRT-LM's .litertlm)."""
