# Changed from the guide: nothing in the class; the base URL of the "Uso" lines comes from BUL_API_URL
# (default the guide's http://localhost:8002) so the tests can point it at a server on a free port, and
# they run under `if __name__ == "__main__"`. The package ships the same client as `bulk.client.BULAPIClient`.
# ruff: noqa
# fmt: off
import os

import requests

class BULAPIClient:
    """Cliente para API REST."""

    def __init__(self, base_url: str = "http://localhost:8002"):
        self.base_url = base_url
        self.session = requests.Session()

    def process_query(self, query: str, priority: int = 1):
        """Procesar query."""
        response = self.session.post(
            f"{self.base_url}/api/query",
            json={"query": query, "priority": priority}
        )
        response.raise_for_status()
        return response.json()

    def get_task_status(self, task_id: str):
        """Obtener estado de task."""
        response = self.session.get(
            f"{self.base_url}/api/task/{task_id}/status"
        )
        response.raise_for_status()
        return response.json()

    def get_stats(self):
        """Obtener estadísticas."""
        response = self.session.get(f"{self.base_url}/api/stats")
        response.raise_for_status()
        return response.json()

# Uso
if __name__ == "__main__":
    client = BULAPIClient(os.environ.get("BUL_API_URL", "http://localhost:8002"))
    result = client.process_query("Create marketing strategy")
