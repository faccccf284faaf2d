"""Text-to-image faithfulness (TiPAI): global + patch scores, chosen/rejected pairs in one database, the TSPO head, the app."""
