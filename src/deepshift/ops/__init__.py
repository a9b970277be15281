"""The ``deepshift::*`` ops: ``schemas`` declares them, ``reference`` defines them in pure torch,
``codes`` holds the packed code format every kernel reads."""
