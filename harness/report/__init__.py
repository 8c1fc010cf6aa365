"""Presentation: tables and figures from the comparison (plots take tables, return Figures),
and the Jinja2 page (templates only render) with the report command.
"""
