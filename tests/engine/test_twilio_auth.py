"""``X-Twilio-Signature``: SignatureCheck gives twilio's RequestValidator.validate answer, on its test vectors and at random."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import MultiDict
from twilio.request_validator import RequestValidator
from twilio_fake import REFERENCE_INBOUND

from flowchat.twilio_auth import SignatureCheck, sign

# twilio-python tests/unit/test_request_validator.py (9.x)
TOKEN = "12345"
URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
PARAMS = {
    "CallSid": "CA1234567890ABCDE",
    "Caller": "+14158675309",
    "Digits": "1234",
    "From": "+14158675309",
    "To": "+18005551212",
}
SIGNATURE = "RSOYDt4T1cUTdK1PDd93/VVr8B8="
SIGNATURE_WITH_PORT = "kvajT1Ptam85bY51eRf/AJRuM3w="


def test_twilio_python_vectors():
    check = SignatureCheck(TOKEN)
    pairs = list(PARAMS.items())

    assert sign(TOKEN, URL, PARAMS) == SIGNATURE
    assert check.valid(URL, pairs, SIGNATURE)
    # a URL without its port validates the signature made with :443 and the other way round
    assert check.valid(URL, pairs, SIGNATURE_WITH_PORT)
    assert check.valid("https://mycompany.com:443/myapp.php?foo=1&bar=2", pairs, SIGNATURE)
    assert not check.valid(URL, pairs, SIGNATURE[:-2] + "A=")
    assert not check.valid(URL, [*pairs[:-1], ("To", "+18005551213")], SIGNATURE)
    assert not check.valid(URL, pairs, "")
    assert not SignatureCheck("").valid(URL, pairs, SIGNATURE)
    assert not SignatureCheck("54321").valid(URL, pairs, SIGNATURE)


def test_the_reference_inbound_fixture():
    """The worked WhatsApp inbound of the Twilio reference (15 params, this URL, this token)."""
    params = dict(REFERENCE_INBOUND)
    check = SignatureCheck("test_auth_token_0123456789abcdef")

    assert check.valid(
        "https://flowchat.example.com/twilio/inbound", list(params.items()), "96QofFr77/Pwj1BjOqkdbH0pL/w="
    )


def test_repeated_names_are_signed_as_twilio_signs_a_multidict():
    pairs = [("MediaUrl", "b"), ("Body", "hi"), ("MediaUrl", "a"), ("MediaUrl", "b")]
    signature = RequestValidator(TOKEN).compute_signature(URL, MultiDict(pairs))

    assert SignatureCheck(TOKEN).valid(URL, pairs, signature)
    assert not SignatureCheck(TOKEN).valid(URL, pairs[:2], signature)


def test_the_per_url_cache_is_bounded():
    check = SignatureCheck(TOKEN)
    for n in range(SignatureCheck.MAX_URLS * 2):
        check.valid(f"https://example.com/twilio/message?n={n}", [], "x")

    assert len(check._urls) <= SignatureCheck.MAX_URLS


texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
urls = st.tuples(
    st.sampled_from(["https", "http"]),
    st.sampled_from(["example.com", "example.com:443", "example.com:80", "example.com:8443", "127.0.0.1:55001"]),
    st.sampled_from(["/twilio/message", "/twilio/status", "/"]),
    st.sampled_from(["", "?flow=a", "?a=1&b=%20x", "?bodySHA256=abc"]),
).map(lambda parts: f"{parts[0]}://{parts[1]}{parts[2]}{parts[3]}")


@settings(max_examples=300, deadline=None)
@given(
    url=urls,
    signed_url=urls,
    pairs=st.lists(st.tuples(st.sampled_from(["Body", "From", "To", "a", "A", "é", ""]) | texts, texts), max_size=6),
    token=st.sampled_from(["tok", "another-token"]),
    tamper=st.booleans(),
)
def test_the_same_answer_as_request_validator(url, signed_url, pairs, token, tamper):
    signature = RequestValidator("tok").compute_signature(signed_url, MultiDict(pairs))
    if tamper:
        signature = signature[:-2] + ("A=" if signature[-2] != "A" else "B=")

    expected = RequestValidator(token).validate(url, MultiDict(pairs), signature)

    assert SignatureCheck(token).valid(url, pairs, signature) is expected
