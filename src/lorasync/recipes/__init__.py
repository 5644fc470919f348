"""Recipes: whole runs wired from the components below (after torchtune's recipes; the
components know no recipe). `demo.py`: the demo, on the real model or a tiny one.
"""
