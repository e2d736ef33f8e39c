"""Command-line interface (thin: parse, call one stage, print)."""
