"""The teacher's chat template on messages a client sent: a refusal is the client's error."""

from __future__ import annotations

import dataclasses

import pytest

from testkit import tokenizers as T

STRICT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}{{ m['role'] }}: {{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def test_a_template_that_refuses_the_messages_gives_a_value_error_naming_the_reason():
    reason = T.missing_reason("gpt2")
    if reason:
        pytest.skip(reason)
    text = dataclasses.replace(T.teacher_text("gpt2"), chat_template=STRICT_TEMPLATE)
    assert text.render_chat([("user", "hi")]) == "user: hi\nassistant:"
    # The service maps ValueError to INVALID_ARGUMENT (not INTERNAL, as jinja's own error would be).
    with pytest.raises(ValueError, match="refused these messages: unknown role tool"):
        text.render_chat([("tool", "{}")])
