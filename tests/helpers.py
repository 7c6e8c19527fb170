"""Test helpers shared across packages (not references: see `references.py` for those).

Import as `import helpers` (tests/ is on sys.path through conftest.py).
"""


def record_calls(monkeypatch, owner, name, key):
  """Replaces `owner.name` by a wrapper that records each call's keyword argument `key`.

  Under `jax.jit` the wrapper runs only while tracing, so the list counts compilations.

  Args:
    monkeypatch: pytest's fixture (the original is restored after the test).
    owner: the module (or object) holding the function.
    name: the function's attribute name.
    key: the keyword argument recorded.

  Returns:
    The list the calls append `kwargs[key]` to, in call order.
  """
  calls = []
  original = getattr(owner, name)

  def recorded(*args, **kwargs):
    calls.append(kwargs[key])
    return original(*args, **kwargs)

  monkeypatch.setattr(owner, name, recorded)
  return calls
