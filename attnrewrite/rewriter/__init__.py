"""Capture front-ends, ``rewrite()``, ``RewrittenModel`` and its report."""
