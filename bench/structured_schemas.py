"""The schemas of `bul bench structured`'s peers part: JSON schemas of the kind applications send to
`/v1/chat/completions` as `response_format: {"type": "json_schema", ...}`, each with the chat prompt
that asks for it. Plain data.

Most use what every structured-output engine serves (objects, arrays with bounds, enums, `$ref` /
`$defs`, `anyOf`, patterns, formats, integer and number bounds, `additionalProperties: false`); the
last ones (`unsupported` in their `keywords`) use keywords an engine may refuse: `not`,
`if` / `then` / `else`, `dependentRequired`, `patternProperties`, `uniqueItems`, `contains`,
`oneOf`, `multipleOf`, `minProperties`, `prefixItems`.

Each entry: `name` (OpenAI's `json_schema.name`: letters, digits, `_` and `-`), `keywords` (what it
exercises, for the report), `prompt` (the user message) and `schema`.
"""

from __future__ import annotations

from typing import Any

SCHEMAS: list[dict[str, Any]] = [
    {
        "name": "product_listing",
        "keywords": ["enum", "number bounds", "array bounds"],
        "prompt": (
            "Turn this into a product listing as JSON: 'Acme TrailRunner 2 hiking boots, waterproof "
            "leather, sizes 8 to 12, $129.99, in stock, colours brown and black.'"
        ),
        "schema": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 60},
                "brand": {"type": "string", "maxLength": 30},
                "price": {"type": "number", "minimum": 0},
                "currency": {"type": "string", "enum": ["USD", "EUR", "GBP"]},
                "in_stock": {"type": "boolean"},
                "colors": {
                    "type": "array",
                    "items": {"type": "string", "maxLength": 20},
                    "minItems": 1,
                    "maxItems": 5,
                },
            },
            "required": ["name", "brand", "price", "currency", "in_stock", "colors"],
            "additionalProperties": False,
        },
    },
    {
        "name": "postal_address",
        "keywords": ["pattern", "additionalProperties false"],
        "prompt": (
            "Extract the postal address as JSON: 'Please ship it to Maria Lopez, 742 Evergreen "
            "Terrace, Apt 3B, Springfield, IL 62704, United States.'"
        ),
        "schema": {
            "type": "object",
            "properties": {
                "recipient": {"type": "string", "maxLength": 60},
                "street": {"type": "string", "maxLength": 80},
                "unit": {"type": "string", "maxLength": 20},
                "city": {"type": "string", "maxLength": 40},
                "state": {"type": "string", "pattern": "^[A-Z]{2}$"},
                "postal_code": {"type": "string", "pattern": "^[0-9]{5}$"},
                "country": {"type": "string", "maxLength": 40},
            },
            "required": ["recipient", "street", "city", "state", "postal_code", "country"],
            "additionalProperties": False,
        },
    },
    {
        "name": "calendar_event",
        "keywords": ["format date", "pattern", "array of emails"],
        "prompt": (
            "Create a calendar event as JSON from this message: 'Team retro next Friday, 2025-03-14, "
            "from 15:00 to 16:00 in room Orion. Invite ana@example.com and li@example.com.'"
        ),
        "schema": {
            "type": "object",
            "properties": {
                "title": {"type": "string", "maxLength": 60},
                "date": {"type": "string", "format": "date"},
                "start": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"},
                "end": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"},
                "location": {"type": "string", "maxLength": 40},
                "attendees": {
                    "type": "array",
                    "items": {"type": "string", "format": "email"},
                    "maxItems": 10,
                },
            },
            "required": ["title", "date", "start", "end", "attendees"],
            "additionalProperties": False,
        },
    },
    {
        "name": "invoice",
        "keywords": ["array of objects", "minItems", "integer bounds", "format date"],
        "prompt": (
            "Extract the invoice as JSON: 'Invoice INV-2041 from Northwind Supplies, dated 2025-01-31. "
            "3 x USB-C cable at 9.50 each, 1 x Laptop stand at 34.00, 2 x Wireless mouse at 19.99. "
            "Total 108.48 EUR.'"
        ),
        "schema": {
            "type": "object",
            "properties": {
                "invoice_number": {"type": "string", "pattern": "^INV-[0-9]+$"},
                "vendor": {"type": "string", "maxLength": 60},
                "date": {"type": "string", "format": "date"},
                "currency": {"type": "string", "enum": ["EUR", "USD", "GBP"]},
                "line_items": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 10,
                    "items": {
                        "type": "object",
                        "properties": {
                            "description": {"type": "string", "maxLength": 40},
                            "quantity": {"type": "integer", "minimum": 1, "maximum": 1000},
                            "unit_price": {"type": "number", "minimum": 0},
                        },
                        "required": ["description", "quantity", "unit_price"],
                        "additionalProperties": False,
                    },
                },
                "total": {"type": "number", "minimum": 0},
            },
            "required": ["invoice_number", "vendor", "date", "currency", "line_items", "total"],
            "additionalProperties": False,
        },
    },
    {
        "name": "user_profile",
        "keywords": ["nested objects", "enum", "boolean", "format email"],
        "prompt": (
            "Build a user profile as JSON for: 'Sam Okafor, sam.okafor@example.org, 34 years old, "
            "prefers dark mode, English, wants email notifications but not SMS.'"
        ),
        "schema": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 60},
                "email": {"type": "string", "format": "email"},
                "age": {"type": "integer", "minimum": 13, "maximum": 120},
                "settings": {
                    "type": "object",
                    "properties": {
                        "theme": {"type": "string", "enum": ["light", "dark", "system"]},
                        "language": {"type": "string", "enum": ["en", "es", "fr", "de"]},
                        "notifications": {
                            "type": "object",
                            "properties": {
                                "email": {"type": "boolean"},
                                "sms": {"type": "boolean"},
                                "push": {"type": "boolean"},
                            },
                            "required": ["email", "sms", "push"],
                            "additionalProperties": False,
                        },
                    },
                    "required": ["theme", "language", "notifications"],
                    "additionalProperties": False,
                },
            },
            "required": ["name", "email", "age", "settings"],
            "additionalProperties": False,
        },
    },
    {
        "name": "api_error",
        "keywords": ["integer bounds", "enum", "optional field"],
        "prompt": (
            "Write the JSON error body an API should return when a client sends an expired access "
            "token to GET /v2/orders."
        ),
        "schema": {
            "type": "object",
            "properties": {
                "status": {"type": "integer", "minimum": 400, "maximum": 599},
                "code": {
                    "type": "string",
                    "enum": ["invalid_token", "expired_token", "forbidden", "not_found"],
                },
                "message": {"type": "string", "maxLength": 120},
                "path": {"type": "string", "maxLength": 60},
                "retryable": {"type": "boolean"},
            },
            "required": ["status", "code", "message", "retryable"],
            "additionalProperties": False,
        },
    },
    {
        "name": "recipe",
        "keywords": ["arrays of objects", "arrays of strings", "integer bounds"],
        "prompt": (
            "Give me a simple pancake recipe as JSON, with the ingredients (name, amount, unit) and "
            "the steps."
        ),
        "schema": {
            "type": "object",
            "properties": {
                "title": {"type": "string", "maxLength": 50},
                "servings": {"type": "integer", "minimum": 1, "maximum": 12},
                "prep_minutes": {"type": "integer", "minimum": 0, "maximum": 240},
                "ingredients": {
                    "type": "array",
                    "minItems": 2,
                    "maxItems": 8,
                    "items": {
                        "type": "object",
                        "properties": {
                            "name": {"type": "string", "maxLength": 30},
                            "amount": {"type": "number", "minimum": 0},
                            "unit": {"type": "string", "enum": ["g", "ml", "cup", "tbsp", "tsp", "piece"]},
                        },
                        "required": ["name", "amount", "unit"],
                        "additionalProperties": False,
                    },
                },
                "steps": {
                    "type": "array",
                    "items": {"type": "string", "maxLength": 80},
                    "minItems": 1,
                    "maxItems": 6,
                },
            },
            "required": ["title", "servings", "ingredients", "steps"],
            "additionalProperties": False,
        },
    },
    {
        "name": "flight_booking",
        "keywords": ["enum", "format date", "pattern", "integer bounds"],
        "prompt": (
            "Book this as JSON: 'One-way flight from Lisbon (LIS) to Berlin (BER) on 2025-06-02 for "
            "2 adults, economy class, window seat please.'"
        ),
        "schema": {
            "type": "object",
            "properties": {
                "origin": {"type": "string", "pattern": "^[A-Z]{3}$"},
                "destination": {"type": "string", "pattern": "^[A-Z]{3}$"},
                "departure_date": {"type": "string", "format": "date"},
                "trip": {"type": "string", "enum": ["one_way", "round_trip"]},
                "cabin": {"type": "string", "enum": ["economy", "premium_economy", "business", "first"]},
                "passengers": {"type": "integer", "minimum": 1, "maximum": 9},
                "seat_preference": {"type": "string", "enum": ["window", "aisle", "none"]},
            },
            "required": ["origin", "destination", "departure_date", "trip", "cabin", "passengers"],
            "additionalProperties": False,
        },
    },
    {
        "name": "sentiment",
        "keywords": ["enum", "number bounds"],
        "prompt": (
            "Classify the sentiment of this review as JSON: 'The battery life is fantastic, but the "
            "screen scratches far too easily.'"
        ),
        "schema": {
            "type": "object",
            "properties": {
                "sentiment": {"type": "string", "enum": ["positive", "negative", "neutral", "mixed"]},
                "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                "aspects": {
                    "type": "array",
                    "maxItems": 4,
                    "items": {
                        "type": "object",
                        "properties": {
                            "aspect": {"type": "string", "maxLength": 20},
                            "polarity": {"type": "string", "enum": ["positive", "negative", "neutral"]},
                        },
                        "required": ["aspect", "polarity"],
                        "additionalProperties": False,
                    },
                },
            },
            "required": ["sentiment", "confidence"],
            "additionalProperties": False,
        },
    },
    {
        "name": "entity_extraction",
        "keywords": ["arrays of objects", "enum"],
        "prompt": (
            "Extract the people and places mentioned as JSON: 'After meeting Ada Lovelace in London, "
            "Charles Babbage travelled to Turin to present his engine.'"
        ),
        "schema": {
            "type": "object",
            "properties": {
                "people": {
                    "type": "array",
                    "maxItems": 6,
                    "items": {
                        "type": "object",
                        "properties": {
                            "name": {"type": "string", "maxLength": 40},
                            "role": {"type": "string", "maxLength": 30},
                        },
                        "required": ["name"],
                        "additionalProperties": False,
                    },
                },
                "places": {
                    "type": "array",
                    "maxItems": 6,
                    "items": {
                        "type": "object",
                        "properties": {
                            "name": {"type": "string", "maxLength": 40},
                            "kind": {"type": "string", "enum": ["city", "country", "region", "building"]},
                        },
                        "required": ["name", "kind"],
                        "additionalProperties": False,
                    },
                },
            },
            "required": ["people", "places"],
            "additionalProperties": False,
        },
    },
    {
        "name": "github_issue",
        "keywords": ["enum", "array bounds", "integer bounds", "format uri"],
        "prompt": (
            "File a GitHub issue as JSON for this bug report: 'The CLI crashes with a KeyError when the "
            "config file has no [server] section. Happens on version 2.3.1 on Linux.'"
        ),
        "schema": {
            "type": "object",
            "properties": {
                "title": {"type": "string", "maxLength": 80},
                "body": {"type": "string", "maxLength": 300},
                "labels": {
                    "type": "array",
                    "items": {
                        "type": "string",
                        "enum": ["bug", "enhancement", "docs", "cli", "config", "linux"],
                    },
                    "maxItems": 4,
                },
                "priority": {"type": "integer", "minimum": 1, "maximum": 4},
                "repository_url": {"type": "string", "format": "uri"},
            },
            "required": ["title", "body", "labels", "priority"],
            "additionalProperties": False,
        },
    },
    {
        "name": "app_config",
        "keywords": ["booleans", "integer bounds", "enum", "nested object"],
        "prompt": (
            "Write a configuration for a web service as JSON: debug off, port 8080, 4 workers, "
            "log level info, CORS enabled, TLS disabled."
        ),
        "schema": {
            "type": "object",
            "properties": {
                "debug": {"type": "boolean"},
                "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                "workers": {"type": "integer", "minimum": 1, "maximum": 64},
                "log_level": {"type": "string", "enum": ["debug", "info", "warning", "error"]},
                "features": {
                    "type": "object",
                    "properties": {
                        "cors": {"type": "boolean"},
                        "tls": {"type": "boolean"},
                        "gzip": {"type": "boolean"},
                    },
                    "required": ["cors", "tls", "gzip"],
                    "additionalProperties": False,
                },
            },
            "required": ["debug", "port", "workers", "log_level", "features"],
            "additionalProperties": False,
        },
    },
    {
        "name": "org_chart",
        "keywords": ["$ref", "$defs"],
        "prompt": (
            "Describe this team as JSON: 'Priya leads engineering; she manages Tom (backend) and "
            "Yuki (frontend). Our address is 1 Main St, Austin.'"
        ),
        "schema": {
            "$defs": {
                "person": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "maxLength": 30},
                        "title": {"type": "string", "maxLength": 30},
                    },
                    "required": ["name", "title"],
                    "additionalProperties": False,
                },
                "address": {
                    "type": "object",
                    "properties": {
                        "street": {"type": "string", "maxLength": 40},
                        "city": {"type": "string", "maxLength": 30},
                    },
                    "required": ["street", "city"],
                    "additionalProperties": False,
                },
            },
            "type": "object",
            "properties": {
                "lead": {"$ref": "#/$defs/person"},
                "members": {"type": "array", "items": {"$ref": "#/$defs/person"}, "maxItems": 5},
                "office": {"$ref": "#/$defs/address"},
            },
            "required": ["lead", "members", "office"],
            "additionalProperties": False,
        },
    },
    {
        "name": "payment_method",
        "keywords": ["anyOf", "const"],
        "prompt": (
            "Record the customer's payment method as JSON: 'I'll pay with my Visa card ending in 4242, "
            "expiring 09/27.'"
        ),
        "schema": {
            "type": "object",
            "properties": {
                "method": {
                    "anyOf": [
                        {
                            "type": "object",
                            "properties": {
                                "kind": {"const": "card"},
                                "brand": {"type": "string", "enum": ["visa", "mastercard", "amex"]},
                                "last4": {"type": "string", "pattern": "^[0-9]{4}$"},
                                "expiry": {"type": "string", "pattern": "^(0[1-9]|1[0-2])/[0-9]{2}$"},
                            },
                            "required": ["kind", "brand", "last4", "expiry"],
                            "additionalProperties": False,
                        },
                        {
                            "type": "object",
                            "properties": {
                                "kind": {"const": "bank_transfer"},
                                "iban": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}[A-Z0-9]{10,30}$"},
                            },
                            "required": ["kind", "iban"],
                            "additionalProperties": False,
                        },
                    ]
                }
            },
            "required": ["method"],
            "additionalProperties": False,
        },
    },
    {
        "name": "meeting_summary",
        "keywords": ["arrays with minItems/maxItems", "format date"],
        "prompt": (
            "Summarise this meeting as JSON with decisions and action items: 'We agreed to ship v2 on "
            "2025-04-01. Dana will update the docs, Lee will fix the login bug, and we drop the beta "
            "banner.'"
        ),
        "schema": {
            "type": "object",
            "properties": {
                "summary": {"type": "string", "maxLength": 200},
                "decisions": {
                    "type": "array",
                    "items": {"type": "string", "maxLength": 80},
                    "minItems": 1,
                    "maxItems": 3,
                },
                "action_items": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 4,
                    "items": {
                        "type": "object",
                        "properties": {
                            "owner": {"type": "string", "maxLength": 20},
                            "task": {"type": "string", "maxLength": 60},
                            "due": {"type": "string", "format": "date"},
                        },
                        "required": ["owner", "task"],
                        "additionalProperties": False,
                    },
                },
            },
            "required": ["summary", "decisions", "action_items"],
            "additionalProperties": False,
        },
    },
    {
        "name": "support_ticket_triage",
        "keywords": ["enum", "integer bounds", "boolean"],
        "prompt": (
            "Triage this support ticket as JSON: 'Since this morning none of our 200 users can log in; "
            "we get a 500 error on the sign-in page.'"
        ),
        "schema": {
            "type": "object",
            "properties": {
                "category": {"type": "string", "enum": ["billing", "login", "performance", "bug", "other"]},
                "severity": {"type": "string", "enum": ["low", "medium", "high", "critical"]},
                "affected_users": {"type": "integer", "minimum": 0},
                "needs_escalation": {"type": "boolean"},
                "reply": {"type": "string", "maxLength": 200},
            },
            "required": ["category", "severity", "affected_users", "needs_escalation", "reply"],
            "additionalProperties": False,
        },
    },
    {
        "name": "job_posting",
        "keywords": ["nested 3 levels", "enum", "integer bounds"],
        "prompt": (
            "Turn this into a job posting as JSON: 'Senior data engineer, remote (EU), full time, "
            "EUR 70k-90k, 5+ years with Python and SQL, Spark a plus.'"
        ),
        "schema": {
            "type": "object",
            "properties": {
                "title": {"type": "string", "maxLength": 50},
                "employment": {"type": "string", "enum": ["full_time", "part_time", "contract"]},
                "location": {
                    "type": "object",
                    "properties": {
                        "remote": {"type": "boolean"},
                        "region": {"type": "string", "maxLength": 30},
                    },
                    "required": ["remote", "region"],
                    "additionalProperties": False,
                },
                "compensation": {
                    "type": "object",
                    "properties": {
                        "currency": {"type": "string", "enum": ["EUR", "USD", "GBP"]},
                        "range": {
                            "type": "object",
                            "properties": {
                                "min": {"type": "integer", "minimum": 0},
                                "max": {"type": "integer", "minimum": 0},
                            },
                            "required": ["min", "max"],
                            "additionalProperties": False,
                        },
                    },
                    "required": ["currency", "range"],
                    "additionalProperties": False,
                },
                "skills": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 6},
                "min_years": {"type": "integer", "minimum": 0, "maximum": 30},
            },
            "required": ["title", "employment", "location", "compensation", "skills"],
            "additionalProperties": False,
        },
    },
    {
        "name": "weather_report",
        "keywords": ["number bounds", "enum", "array bounds"],
        "prompt": "Give a 3-day weather forecast for Oslo as JSON, temperatures in Celsius.",
        "schema": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {
                    "type": "array",
                    "minItems": 3,
                    "maxItems": 3,
                    "items": {
                        "type": "object",
                        "properties": {
                            "day": {
                                "type": "string",
                                "enum": [
                                    "monday",
                                    "tuesday",
                                    "wednesday",
                                    "thursday",
                                    "friday",
                                    "saturday",
                                    "sunday",
                                ],
                            },
                            "high": {"type": "number", "minimum": -60, "maximum": 60},
                            "low": {"type": "number", "minimum": -60, "maximum": 60},
                            "conditions": {
                                "type": "string",
                                "enum": ["sunny", "cloudy", "rain", "snow", "storm"],
                            },
                        },
                        "required": ["day", "high", "low", "conditions"],
                        "additionalProperties": False,
                    },
                },
            },
            "required": ["city", "unit", "days"],
            "additionalProperties": False,
        },
    },
    {
        "name": "contact_card",
        "keywords": ["format email", "format uri", "pattern"],
        "prompt": (
            "Extract the contact details as JSON from this signature: 'Jordan Reyes | Head of Sales, "
            "Blue Harbor Ltd | jordan@blueharbor.io | +1-415-555-0134 | https://blueharbor.io'"
        ),
        "schema": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 40},
                "title": {"type": "string", "maxLength": 40},
                "company": {"type": "string", "maxLength": 40},
                "email": {"type": "string", "format": "email"},
                "phone": {"type": "string", "pattern": "^\\+?[0-9\\- ]{7,20}$"},
                "website": {"type": "string", "format": "uri"},
            },
            "required": ["name", "company", "email"],
            "additionalProperties": False,
        },
    },
    {
        "name": "order_status",
        "keywords": ["enum", "format date-time", "pattern"],
        "prompt": (
            "Report the order status as JSON: 'Order #A-99812 shipped with DHL on 2025-02-10T09:30:00Z, "
            "tracking 1Z999AA10123456784, expected in 3 days.'"
        ),
        "schema": {
            "type": "object",
            "properties": {
                "order_id": {"type": "string", "pattern": "^[A-Z]-[0-9]+$"},
                "status": {
                    "type": "string",
                    "enum": ["pending", "processing", "shipped", "delivered", "cancelled"],
                },
                "carrier": {"type": "string", "enum": ["DHL", "UPS", "FedEx", "USPS", "other"]},
                "shipped_at": {"type": "string", "format": "date-time"},
                "tracking_number": {"type": "string", "maxLength": 30},
                "eta_days": {"type": "integer", "minimum": 0, "maximum": 60},
            },
            "required": ["order_id", "status", "carrier", "tracking_number"],
            "additionalProperties": False,
        },
    },
    {
        "name": "book_metadata",
        "keywords": ["integer bounds", "array bounds", "pattern"],
        "prompt": ("Give the bibliographic record of 'Dune' by Frank Herbert (Chilton Books, 1965) as JSON."),
        "schema": {
            "type": "object",
            "properties": {
                "title": {"type": "string", "maxLength": 60},
                "authors": {
                    "type": "array",
                    "items": {"type": "string", "maxLength": 40},
                    "minItems": 1,
                    "maxItems": 3,
                },
                "publisher": {"type": "string", "maxLength": 40},
                "year": {"type": "integer", "minimum": 1450, "maximum": 2030},
                "isbn": {"type": "string", "pattern": "^[0-9\\-]{10,17}$"},
                "genres": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
            },
            "required": ["title", "authors", "year"],
            "additionalProperties": False,
        },
    },
    {
        "name": "movie_review",
        "keywords": ["integer bounds", "enum", "boolean"],
        "prompt": "Review the film 'Spirited Away' as JSON with a score from 1 to 10.",
        "schema": {
            "type": "object",
            "properties": {
                "title": {"type": "string", "maxLength": 50},
                "score": {"type": "integer", "minimum": 1, "maximum": 10},
                "verdict": {"type": "string", "enum": ["must_see", "worth_it", "skip"]},
                "spoilers": {"type": "boolean"},
                "review": {"type": "string", "maxLength": 300},
            },
            "required": ["title", "score", "verdict", "spoilers", "review"],
            "additionalProperties": False,
        },
    },
    {
        "name": "expense_report",
        "keywords": ["array of objects", "enum", "format date", "number bounds"],
        "prompt": (
            "Itemise these expenses as JSON: 'Taxi to the airport 42.50 on 2025-05-03, hotel 2 nights "
            "310.00 on 2025-05-04, team dinner 128.90 on 2025-05-04.'"
        ),
        "schema": {
            "type": "object",
            "properties": {
                "employee": {"type": "string", "maxLength": 40},
                "items": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 6,
                    "items": {
                        "type": "object",
                        "properties": {
                            "date": {"type": "string", "format": "date"},
                            "category": {
                                "type": "string",
                                "enum": ["travel", "lodging", "meals", "supplies", "other"],
                            },
                            "amount": {"type": "number", "minimum": 0, "maximum": 10000},
                            "note": {"type": "string", "maxLength": 40},
                        },
                        "required": ["date", "category", "amount"],
                        "additionalProperties": False,
                    },
                },
            },
            "required": ["items"],
            "additionalProperties": False,
        },
    },
    {
        "name": "medical_appointment",
        "keywords": ["enum", "format date", "pattern", "boolean"],
        "prompt": (
            "Schedule this as JSON: 'Book a follow-up with Dr. Chen (dermatology) on 2025-07-21 at "
            "10:30, in person, patient is new to the clinic: no.'"
        ),
        "schema": {
            "type": "object",
            "properties": {
                "doctor": {"type": "string", "maxLength": 40},
                "specialty": {
                    "type": "string",
                    "enum": ["general", "dermatology", "cardiology", "pediatrics", "other"],
                },
                "date": {"type": "string", "format": "date"},
                "time": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"},
                "visit_type": {"type": "string", "enum": ["in_person", "video", "phone"]},
                "new_patient": {"type": "boolean"},
            },
            "required": ["doctor", "specialty", "date", "time", "visit_type", "new_patient"],
            "additionalProperties": False,
        },
    },
    {
        "name": "translation",
        "keywords": ["enum", "array bounds"],
        "prompt": "Translate 'Where is the train station?' into French, Spanish and German, as JSON.",
        "schema": {
            "type": "object",
            "properties": {
                "source": {"type": "string", "maxLength": 60},
                "translations": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 3,
                    "items": {
                        "type": "object",
                        "properties": {
                            "language": {"type": "string", "enum": ["fr", "es", "de", "it"]},
                            "text": {"type": "string", "maxLength": 80},
                        },
                        "required": ["language", "text"],
                        "additionalProperties": False,
                    },
                },
            },
            "required": ["source", "translations"],
            "additionalProperties": False,
        },
    },
    {
        "name": "search_query",
        "keywords": ["enum", "integer bounds", "anyOf with null"],
        "prompt": (
            "Turn this request into a structured search query as JSON: 'Show me the 20 newest "
            "open-source Rust projects about databases, no archived ones.'"
        ),
        "schema": {
            "type": "object",
            "properties": {
                "keywords": {
                    "type": "array",
                    "items": {"type": "string", "maxLength": 20},
                    "minItems": 1,
                    "maxItems": 4,
                },
                "language": {"anyOf": [{"type": "string", "maxLength": 20}, {"type": "null"}]},
                "sort": {"type": "string", "enum": ["newest", "stars", "relevance"]},
                "limit": {"type": "integer", "minimum": 1, "maximum": 100},
                "include_archived": {"type": "boolean"},
            },
            "required": ["keywords", "language", "sort", "limit", "include_archived"],
            "additionalProperties": False,
        },
    },
    {
        "name": "tool_call_weather",
        "keywords": ["enum", "function-call arguments"],
        "prompt": "Call the weather tool for Tokyo in Celsius; reply only with its arguments as JSON.",
        "schema": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "maxLength": 40},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location", "unit"],
            "additionalProperties": False,
        },
    },
    {
        "name": "quiz_question",
        "keywords": ["array with exactly 4 items", "integer bounds"],
        "prompt": "Write one multiple-choice question about the solar system as JSON, with 4 options.",
        "schema": {
            "type": "object",
            "properties": {
                "question": {"type": "string", "maxLength": 120},
                "options": {
                    "type": "array",
                    "items": {"type": "string", "maxLength": 40},
                    "minItems": 4,
                    "maxItems": 4,
                },
                "answer_index": {"type": "integer", "minimum": 0, "maximum": 3},
                "explanation": {"type": "string", "maxLength": 150},
            },
            "required": ["question", "options", "answer_index"],
            "additionalProperties": False,
        },
    },
    {
        "name": "log_event",
        "keywords": ["format date-time", "enum", "pattern", "open object"],
        "prompt": (
            "Parse this log line into JSON: '2025-03-02T11:04:55Z ERROR payment-svc [req=7f3a91] "
            "timeout calling bank API after 30000 ms'"
        ),
        "schema": {
            "type": "object",
            "properties": {
                "timestamp": {"type": "string", "format": "date-time"},
                "level": {"type": "string", "enum": ["DEBUG", "INFO", "WARN", "ERROR", "FATAL"]},
                "service": {"type": "string", "pattern": "^[a-z][a-z0-9-]*$"},
                "request_id": {"type": "string", "pattern": "^[0-9a-f]{6,32}$"},
                "message": {"type": "string", "maxLength": 120},
                "duration_ms": {"type": "integer", "minimum": 0},
            },
            "required": ["timestamp", "level", "service", "message"],
        },
    },
    {
        "name": "real_estate_listing",
        "keywords": ["integer bounds", "number bounds", "enum", "nested object"],
        "prompt": (
            "Make a listing as JSON: '2-bedroom flat, 68 square metres, 3rd floor with lift, balcony, "
            "Rua das Flores, Porto, asking 245000 EUR.'"
        ),
        "schema": {
            "type": "object",
            "properties": {
                "kind": {"type": "string", "enum": ["flat", "house", "studio", "land"]},
                "bedrooms": {"type": "integer", "minimum": 0, "maximum": 10},
                "area_m2": {"type": "number", "exclusiveMinimum": 0, "maximum": 2000},
                "floor": {"type": "integer", "minimum": -2, "maximum": 100},
                "amenities": {
                    "type": "array",
                    "items": {"type": "string", "enum": ["lift", "balcony", "parking", "garden", "pool"]},
                    "maxItems": 5,
                },
                "location": {
                    "type": "object",
                    "properties": {
                        "street": {"type": "string", "maxLength": 40},
                        "city": {"type": "string", "maxLength": 30},
                    },
                    "required": ["street", "city"],
                    "additionalProperties": False,
                },
                "price_eur": {"type": "integer", "minimum": 0},
            },
            "required": ["kind", "bedrooms", "area_m2", "location", "price_eur"],
            "additionalProperties": False,
        },
    },
    {
        "name": "survey_response",
        "keywords": ["integer bounds", "enum", "optional fields"],
        "prompt": (
            "Record this survey answer as JSON: 'I'd rate the onboarding 4 out of 5, support 5 out of 5; "
            "I'd probably recommend you (8/10). More video tutorials would help.'"
        ),
        "schema": {
            "type": "object",
            "properties": {
                "onboarding": {"type": "integer", "minimum": 1, "maximum": 5},
                "support": {"type": "integer", "minimum": 1, "maximum": 5},
                "nps": {"type": "integer", "minimum": 0, "maximum": 10},
                "would_recommend": {"type": "string", "enum": ["yes", "maybe", "no"]},
                "comment": {"type": "string", "maxLength": 200},
            },
            "required": ["onboarding", "support", "nps"],
            "additionalProperties": False,
        },
    },
    {
        "name": "sql_query_plan",
        "keywords": ["enum", "array of strings", "boolean"],
        "prompt": (
            "Describe, as JSON, the SQL query that lists the 10 customers with the highest total order "
            "value in 2024."
        ),
        "schema": {
            "type": "object",
            "properties": {
                "sql": {"type": "string", "maxLength": 300},
                "tables": {
                    "type": "array",
                    "items": {"type": "string", "maxLength": 30},
                    "minItems": 1,
                    "maxItems": 4,
                },
                "operation": {"type": "string", "enum": ["select", "insert", "update", "delete"]},
                "uses_aggregation": {"type": "boolean"},
            },
            "required": ["sql", "tables", "operation", "uses_aggregation"],
            "additionalProperties": False,
        },
    },
    {
        "name": "nutrition_facts",
        "keywords": ["number bounds", "nested object"],
        "prompt": "Give the nutrition facts of one medium banana as JSON.",
        "schema": {
            "type": "object",
            "properties": {
                "food": {"type": "string", "maxLength": 30},
                "serving_g": {"type": "number", "minimum": 0, "maximum": 1000},
                "calories": {"type": "number", "minimum": 0, "maximum": 2000},
                "macros": {
                    "type": "object",
                    "properties": {
                        "protein_g": {"type": "number", "minimum": 0},
                        "carbs_g": {"type": "number", "minimum": 0},
                        "fat_g": {"type": "number", "minimum": 0},
                    },
                    "required": ["protein_g", "carbs_g", "fat_g"],
                    "additionalProperties": False,
                },
            },
            "required": ["food", "serving_g", "calories", "macros"],
            "additionalProperties": False,
        },
    },
    {
        "name": "file_tree",
        "keywords": ["recursive $ref"],
        "prompt": (
            "Describe this folder as JSON: a folder 'src' holding 'main.py' and a folder 'utils' that "
            "holds 'io.py'."
        ),
        "schema": {
            "$defs": {
                "node": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "maxLength": 30},
                        "kind": {"type": "string", "enum": ["file", "folder"]},
                        "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 4},
                    },
                    "required": ["name", "kind"],
                    "additionalProperties": False,
                }
            },
            "$ref": "#/$defs/node",
        },
    },
    # ---- keywords an engine may not support ----------------------------------------------------------
    {
        "name": "username_not_reserved",
        "keywords": ["unsupported", "not"],
        "prompt": (
            "Suggest a new account for a photographer called Mia as JSON (a username and a display name)."
        ),
        "schema": {
            "type": "object",
            "properties": {
                "username": {
                    "type": "string",
                    "pattern": "^[a-z0-9_]{3,20}$",
                    "not": {"enum": ["admin", "root", "system"]},
                },
                "display_name": {"type": "string", "maxLength": 40},
            },
            "required": ["username", "display_name"],
            "additionalProperties": False,
        },
    },
    {
        "name": "shipping_conditional",
        "keywords": ["unsupported", "if/then/else"],
        "prompt": (
            "Give the shipping details as JSON: 'Send it to Canada, postcode K1A 0B1, express delivery.'"
        ),
        "schema": {
            "type": "object",
            "properties": {
                "country": {"type": "string", "enum": ["US", "CA", "GB"]},
                "postal_code": {"type": "string", "maxLength": 10},
                "speed": {"type": "string", "enum": ["standard", "express"]},
            },
            "required": ["country", "postal_code", "speed"],
            "if": {"properties": {"country": {"const": "US"}}},
            "then": {"properties": {"postal_code": {"pattern": "^[0-9]{5}$"}}},
            "else": {"properties": {"postal_code": {"pattern": "^[A-Z0-9 ]{3,10}$"}}},
            "additionalProperties": False,
        },
    },
    {
        "name": "billing_dependent",
        "keywords": ["unsupported", "dependentRequired"],
        "prompt": (
            "Fill in the billing form as JSON: 'Card holder Alex Kim, card number 4111 1111 1111 1111, "
            "billing address 9 Elm Road, Leeds.'"
        ),
        "schema": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 40},
                "credit_card": {"type": "string", "pattern": "^[0-9 ]{12,23}$"},
                "billing_address": {"type": "string", "maxLength": 80},
            },
            "required": ["name"],
            "dependentRequired": {"credit_card": ["billing_address"]},
            "additionalProperties": False,
        },
    },
    {
        "name": "http_headers",
        "keywords": ["unsupported", "patternProperties"],
        "prompt": (
            "List the HTTP response headers of a JSON API answer that must not be cached, as a JSON object."
        ),
        "schema": {
            "type": "object",
            "patternProperties": {"^[A-Za-z][A-Za-z0-9-]*$": {"type": "string", "maxLength": 60}},
            "additionalProperties": False,
            "maxProperties": 6,
        },
    },
    {
        "name": "tags_unique",
        "keywords": ["unsupported", "uniqueItems"],
        "prompt": "Suggest tags for a blog post about baking sourdough bread at home, as JSON.",
        "schema": {
            "type": "object",
            "properties": {
                "tags": {
                    "type": "array",
                    "items": {"type": "string", "pattern": "^[a-z-]{2,20}$"},
                    "minItems": 2,
                    "maxItems": 6,
                    "uniqueItems": True,
                }
            },
            "required": ["tags"],
            "additionalProperties": False,
        },
    },
    {
        "name": "playlist_contains",
        "keywords": ["unsupported", "contains"],
        "prompt": "Make a short workout playlist as JSON; it must include at least one song by Queen.",
        "schema": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 40},
                "tracks": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 5,
                    "items": {
                        "type": "object",
                        "properties": {
                            "title": {"type": "string", "maxLength": 40},
                            "artist": {"type": "string", "maxLength": 30},
                        },
                        "required": ["title", "artist"],
                        "additionalProperties": False,
                    },
                    "contains": {
                        "type": "object",
                        "properties": {"artist": {"const": "Queen"}},
                        "required": ["artist"],
                    },
                },
            },
            "required": ["name", "tracks"],
            "additionalProperties": False,
        },
    },
    {
        "name": "shape_oneof",
        "keywords": ["unsupported", "oneOf"],
        "prompt": "Describe a circle of radius 3 centred at the origin as JSON.",
        "schema": {
            "type": "object",
            "properties": {
                "shape": {
                    "oneOf": [
                        {
                            "type": "object",
                            "properties": {
                                "type": {"const": "circle"},
                                "radius": {"type": "number", "minimum": 0},
                            },
                            "required": ["type", "radius"],
                            "additionalProperties": False,
                        },
                        {
                            "type": "object",
                            "properties": {
                                "type": {"const": "rectangle"},
                                "width": {"type": "number", "minimum": 0},
                                "height": {"type": "number", "minimum": 0},
                            },
                            "required": ["type", "width", "height"],
                            "additionalProperties": False,
                        },
                    ]
                },
                "center": {
                    "type": "object",
                    "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                    "required": ["x", "y"],
                    "additionalProperties": False,
                },
            },
            "required": ["shape", "center"],
            "additionalProperties": False,
        },
    },
    {
        "name": "pricing_multipleof",
        "keywords": ["unsupported", "multipleOf"],
        "prompt": (
            "Price a monthly and a yearly plan for a note-taking app as JSON, in cents, rounded to 5 cents."
        ),
        "schema": {
            "type": "object",
            "properties": {
                "monthly_cents": {"type": "integer", "minimum": 0, "maximum": 100000, "multipleOf": 5},
                "yearly_cents": {"type": "integer", "minimum": 0, "maximum": 1000000, "multipleOf": 5},
                "trial_days": {"type": "integer", "minimum": 0, "maximum": 60},
            },
            "required": ["monthly_cents", "yearly_cents", "trial_days"],
            "additionalProperties": False,
        },
    },
    {
        "name": "feature_flags_minproperties",
        "keywords": ["unsupported", "minProperties", "additionalProperties schema"],
        "prompt": "List the feature flags of a beta release as a JSON object of flag name to on/off.",
        "schema": {
            "type": "object",
            "additionalProperties": {"type": "boolean"},
            "minProperties": 2,
            "maxProperties": 8,
        },
    },
    {
        "name": "geo_point_prefixitems",
        "keywords": ["unsupported", "prefixItems"],
        "prompt": (
            "Give the location of the Eiffel Tower as JSON, with its coordinates as a [latitude, "
            "longitude] pair."
        ),
        "schema": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 40},
                "coordinates": {
                    "type": "array",
                    "prefixItems": [
                        {"type": "number", "minimum": -90, "maximum": 90},
                        {"type": "number", "minimum": -180, "maximum": 180},
                    ],
                    "items": False,
                    "minItems": 2,
                },
            },
            "required": ["name", "coordinates"],
            "additionalProperties": False,
        },
    },
]
