import json
def test_probe(client, usage_headers, fund):
    fund("c1", 10)
    h = {**usage_headers, "content-type": "application/json"}
    bodies = [
        '{"customer_id":"c1","\\ud800":1}',
        '{"customer_id":"c1","metadata":{"\\ud800":{"a":1}}}',
        '{"customer_id":"c1","metadata":{"\\ud800":1}}',
        '{"customer_id":"c1","metadata":{"a":"\\ud800"}}',
        '{"customer_id":"\\ud800"}',
        '{"customer_id":"c1","metadata":{"a":NaN}}',
        '{"customer_id":"c1","credits":NaN}',
        '{"customer_id":"c1","metadata":{"a":{"b":1}}}',
        '{"customer_id":"c1","metadata":{"a":[1]}}',
        '{"customer_id":"c1","metadata":{"a":null}}',
        '{"customer_id":"c1","metadata":"x"}',
        '{"customer_id":"c1","credits":"3"}',
        '{"customer_id":"c1","credits":1.0}',
        '{"customer_id":"c1","credits":true}',
        '{"customer_id":"c1","credits":null}',
        '{"customer_id":1}',
        '{"customer_id":"c1","x":1}',
        '[1,2]',
        '1',
        'null',
        '{"customer_id":"c1"',
        '[' * 100000 + ']' * 100000,
        '{"customer_id":"c1","metadata":{"a":' + '9'*5000 + '}}',
        '{"customer_id":"c1","credits":' + '9'*5000 + '}',
        '"\\ud800"',
        '{"\\ud800":1}',
        '{"customer_id":"c1","metadata":{"a":1e400}}',
        '{"customer_id":"c1","metadata":{"a":-0.0}}',
    ]
    for b in bodies:
        r = client.post("/v1/usage", content=b.encode(), headers=h)
        print(b[:80], r.status_code, r.text[:300])
    r = client.post("/v1/usage", content=b'{"customer_id":"c1"}', headers={**usage_headers, "content-type":"text/plain"})
    print("text/plain", r.status_code, r.text)
    r = client.post("/v1/usage", content=b'{"customer_id":"c1"}', headers={**usage_headers})
    print("no ct", r.status_code, r.text)
    r = client.post("/v1/usage", content=b'\xff\xfe', headers=h)
    print("bad utf8", r.status_code, r.text)
    r = client.post("/v1/usage", content=b'{"customer_id":"c1", "metadata":{"a":"' + b"x"*300000 + b'"}}', headers=h)
    print("big", r.status_code, r.text)
    r = client.get("/v1/customers/c1/usage?cursor=zzz", headers=h)
    print("cursor", r.status_code, r.text)
    r = client.get("/v1/customers/c1/usage?limit=0", headers=h)
    print("limit", r.status_code, r.text)
    r = client.get("/v1/customers/c1/usage?limit=201", headers=h)
    print("limit", r.status_code, r.text)
    r = client.get("/v1/customers/c1/usage?limit=x", headers=h)
    print("limit", r.status_code, r.text)
    r = client.post("/v1/usage", json={"customer_id":"c1"}, headers={**h, "Idempotency-Key": ""})
    print("empty key", r.status_code, r.text)
    r = client.post("/v1/usage", json={"customer_id":"c1"}, headers={**h, "Idempotency-Key": "a"*256})
    print("long key", r.status_code, r.text)
    assert 0
