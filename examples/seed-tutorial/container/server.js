const express = require('express');
const app = express();
const port = 8080;
const host = '0.0.0.0';
app.get('/', (req, res) => {
  res.status(200).send('Hello World');
});
app.listen(port, host, () => {
  console.log(`Server is running on http://${host}:${port}`);
});
