"""``python -m domainpolicy``: the same command line as the ``domainpolicy`` script."""

from domainpolicy._cli import console

console()
